"""One check, used by tune, export-onnx and quant: a dataset must be tokenized
with the model's own tokenizer. A mismatch trains, calibrates or evaluates on
token ids that mean other words, silently; this turns it into an exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from mk.core.artifact import Artifact
from mk.core.console import log
from mk.core.errors import BadInput, library_error

# The files whose presence means "this folder holds a tokenizer".
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
               "tokenizer.model")


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in VOCAB_FILES)


def load_tokenizer(path: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                          trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise library_error(e, path, "cannot load its tokenizer") from None


def special_token_ids(tok) -> dict[str, int]:
    return {name: tok.convert_tokens_to_ids(value)
            for name, value in sorted(tok.special_tokens_map.items()) if isinstance(value, str)}


def _differences(model_tok, data_tok, what: str) -> list[str]:
    diffs = []
    if len(model_tok) != len(data_tok):
        diffs.append(f"vocabulary of {len(data_tok)} tokens, the {what}'s has {len(model_tok)}")
    elif model_tok.get_vocab() != data_tok.get_vocab():
        diffs.append("same vocabulary size but different tokens")
    mine, theirs = special_token_ids(model_tok), special_token_ids(data_tok)
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        diffs.append("different special tokens (" + ", ".join(changed) + ")")
    return diffs


def _declared_differences(model_tok, declared: dict, what: str) -> list[str]:
    """Against the "tokenizer" entry `mk prep` records, for datasets without tokenizer files."""
    diffs = []
    if int(declared["vocab_size"]) != len(model_tok):
        diffs.append(f"vocabulary of {declared['vocab_size']} tokens, the {what}'s has {len(model_tok)}")
    ids, mine = declared.get("special_token_ids") or {}, special_token_ids(model_tok)
    changed = sorted(k for k in ids if k in mine and ids[k] != mine[k])
    if changed:
        diffs.append("different special tokens (" + ", ".join(changed) + ")")
    return diffs


def _token_range_differences(model_path: Path, dataset: Artifact, what: str) -> list[str]:
    """Token ids beyond the model's embedding table mean another tokenizer too."""
    from mk.core.dataset import SPLITS, load_split

    try:
        vocab = json.loads((Path(model_path) / "config.json").read_text()).get("vocab_size")
    except (OSError, json.JSONDecodeError):
        return []
    for split in SPLITS:
        if vocab and (dataset.path / f"{split}.safetensors").is_file():
            ids = load_split(dataset, split).get("input_ids")
            if ids is not None and ids.size and int(ids.max()) >= vocab:
                return [f"token id {int(ids.max())} is beyond the {what}'s vocabulary of {vocab}"]
            return []
    return []


def check_same_tokenizer(dataset: Artifact, model_path: Path, what: str = "model"):
    """Refuse a dataset tokenized by another tokenizer than the model's (vocabulary
    and special tokens with their ids). Returns the tokenizer to ship with an
    output: the model's, else the dataset's, else None."""
    model_path = Path(model_path)
    model_tok = load_tokenizer(model_path) if has_tokenizer(model_path) else None
    data_tok = load_tokenizer(dataset.path) if has_tokenizer(dataset.path) else None
    declared = dataset.manifest.get("tokenizer")
    if model_tok is not None and data_tok is not None:
        diffs = _differences(model_tok, data_tok, what)
    elif model_tok is not None and isinstance(declared, dict) and declared.get("vocab_size"):
        diffs = _declared_differences(model_tok, declared, what)
    else:
        diffs = _token_range_differences(model_path, dataset, what)
        if not diffs:
            log.warning("cannot compare tokenizers (no tokenizer beside the %s or the data): trusting that "
                        "%s was tokenized for %s", what, dataset.path, model_path)
    if diffs:
        raise BadInput(f"{dataset.path}: tokenized with another tokenizer than the {what} {model_path}: "
                       + "; ".join(diffs[:3]),
                       hint=f"prepare the data with the {what}'s tokenizer: mk prep … --tokenizer {model_path}")
    return model_tok or data_tok
