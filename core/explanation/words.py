"""Texts as words: tokenize with the word each token belongs to, sum token scores per
word, and turn a dataset's token ids back into text.

Words are the fast tokenizer's words (`word_ids()`): its pre-tokenizer splits on
whitespace and punctuation, so "don't" is three words; each word keeps its
character span so the text shows as it was typed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mk.core.errors import BadInput


@dataclass
class Encoded:
    """One text, tokenized: the model's inputs and how tokens group into words."""

    text: str
    input_ids: np.ndarray            # (seq,) int64
    attention_mask: np.ndarray       # (seq,) int64
    tokens: list[str]
    word_of_token: list[int | None]  # the word index of each token; None for special tokens
    words: list[dict]                # {"word", "start", "end", "tokens": [token indices]}
    truncated: bool

    @property
    def word_positions(self) -> np.ndarray:
        """Indices of the tokens that belong to a word (not [CLS], [SEP], …)."""
        return np.array([i for i, w in enumerate(self.word_of_token) if w is not None], dtype=np.int64)

    def feature_mask(self) -> np.ndarray:
        """The word index of each word token: Captum's feature mask over word_positions."""
        return np.array([w for w in self.word_of_token if w is not None], dtype=np.int64)


def require_fast(tok, where) -> None:
    if not getattr(tok, "is_fast", False):
        raise BadInput(f"{where}: its tokenizer is not a fast (Rust) tokenizer; mk explain needs one "
                       "to map word pieces to words", hint="save the model with a tokenizer.json")


def encode(tok, text: str, max_length: int, where: str = "text") -> Encoded:
    """Tokenize `text` (truncated to max_length tokens) keeping the word of each token."""
    if not text.strip():
        raise BadInput(f"{where}: empty text; there is nothing to explain")
    enc = tok(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    full_length = len(tok(text, truncation=False)["input_ids"])
    word_ids = enc.word_ids()
    renumber: dict[int, int] = {}
    words: list[dict] = []
    word_of_token: list[int | None] = []
    for i, (w, (start, end)) in enumerate(zip(word_ids, enc["offset_mapping"])):
        if w is None:
            word_of_token.append(None)
            continue
        if w not in renumber:
            renumber[w] = len(words)
            words.append({"start": start, "end": end, "tokens": []})
        word = words[renumber[w]]
        word["start"], word["end"] = min(word["start"], start), max(word["end"], end)
        word["tokens"].append(i)
        word_of_token.append(renumber[w])
    if not words:
        raise BadInput(f"{where}: the tokenizer keeps no words of {text[:40]!r}")
    for word in words:
        word["word"] = text[word["start"]:word["end"]]
    return Encoded(text=text, input_ids=np.asarray(enc["input_ids"], dtype=np.int64),
                   attention_mask=np.asarray(enc["attention_mask"], dtype=np.int64),
                   tokens=tok.convert_ids_to_tokens(enc["input_ids"]), word_of_token=word_of_token,
                   words=words, truncated=full_length > len(enc["input_ids"]))


def sum_per_word(token_scores: np.ndarray, enc: Encoded) -> np.ndarray:
    """A word's score is the sum of its word pieces' scores."""
    return np.array([float(np.sum(token_scores[w["tokens"]])) for w in enc.words])


def decode_rows(tok, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[str]:
    """A dataset's rows back to text: the real tokens without [CLS]/[SEP]/padding. [UNK]
    and other special tokens inside the text stay, so re-tokenizing gives the same ids."""
    framing = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} - {None}
    texts = []
    for ids, mask in zip(input_ids, attention_mask):
        kept = [int(i) for i, m in zip(ids, mask) if m and int(i) not in framing]
        texts.append(tok.decode(kept, clean_up_tokenization_spaces=True))
    return texts
