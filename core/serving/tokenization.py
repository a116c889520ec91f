"""Texts to token ids with the artifact's own (fast) tokenizer, unpadded: the
batcher pads each runtime call to its own longest row."""

from __future__ import annotations

import numpy as np

from mk.core.artifact import Artifact
from mk.core.errors import BadInput


class TooLong(ValueError):
    """Inputs over the model's limit when truncation is off."""


class TextEncoder:
    def __init__(self, art: Artifact, max_length: int | None):
        from mk.core.tokenizer_match import has_tokenizer, load_tokenizer

        if not has_tokenizer(art.path):
            raise BadInput(f"{art.path}: has no tokenizer files, so it cannot take text",
                           hint="copy the tokenizer it was trained with into the folder (tokenizer.json)")
        tok = load_tokenizer(art.path)
        if not getattr(tok, "is_fast", False):
            raise BadInput(f"{art.path}: its tokenizer has no fast (Rust) version; mk serve needs one")
        limit = tok.model_max_length if tok.model_max_length < 1_000_000 else None
        self.max_length = min(x for x in (max_length, limit, 512) if x)
        self.pad_id = tok.pad_token_id or 0
        # The Rust tokenizer itself, unpadded and untruncated: one call per request, and
        # the true length of every input is known (to truncate, or to refuse).
        from tokenizers import Tokenizer

        self.full = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        self.full.no_padding()
        self.full.no_truncation()
        self.cut = Tokenizer.from_str(self.full.to_str())
        self.cut.enable_truncation(self.max_length)

    def encode(self, texts: list[str], pairs: list[str | None] | None, truncate: bool
               ) -> tuple[dict[str, np.ndarray], list[int]]:
        """{input_ids, attention_mask, token_type_ids} padded to the longest of these
        rows (a text with a pair is one row), and the indices of the rows that were truncated."""
        items = texts if pairs is None else [t if q is None else (t, q) for t, q in zip(texts, pairs)]
        encs = self.full.encode_batch(items)
        over = [i for i, e in enumerate(encs) if len(e.ids) > self.max_length]
        if over and not truncate:
            n = max(len(encs[i].ids) for i in over)
            raise TooLong(f"{len(over)} input(s) longer than the model's {self.max_length} tokens "
                          f"(the longest has {n}; input {over[0]} is the first); truncation is off")
        if over:
            for i, e in zip(over, self.cut.encode_batch([items[i] for i in over])):
                encs[i] = e
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for r, e in enumerate(encs):
            n = len(e.ids)
            ids[r, :n], types[r, :n], mask[r, :n] = e.ids, e.type_ids, 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, over
