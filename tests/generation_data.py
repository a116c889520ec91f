"""Text-generation dataset artifacts in the layout of the causal-LM contract
(what `mk prep --task generate` writes), built from (prompt, completion) pairs:
the tokenizer's chat template around the prompt, the completion closed by the
end-of-turn token, labels -100 on the prompt and the padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INSTRUCTION = "Classify the sentiment of this tweet as negative, neutral or positive.\nTweet: "


def encode_pair(tok, prompt: str, completion: str, max_length: int) -> tuple[list[int], int] | None:
    """(prompt + completion ids, prompt length), or None when it does not fit."""
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                tokenize=True, return_dict=False)
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return (list(p) + c, len(p)) if len(p) + len(c) <= max_length else None


def split_arrays(rows: list[tuple[list[int], int]], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(rows)
    ids = np.full((n, max_length), pad_id, np.int32)
    mask = np.zeros((n, max_length), np.int8)
    labels = np.full((n, max_length), -100, np.int64)
    for i, (seq, plen) in enumerate(rows):
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        labels[i, plen:len(seq)] = seq[plen:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": np.array([p for _, p in rows], np.int32)}


def make_generation_dataset(out: Path, tokenizer_dir: Path, pairs: list[tuple[str, str]],
                            sizes=(48, 16, 16), max_length: int = 96, answers: bool = True) -> Path:
    """A dataset artifact of the first fitting `sum(sizes)` pairs, split in order;
    `answers`: the completions are answers (labels in the manifest), so exact
    match is measured."""
    from transformers import AutoTokenizer

    from mk.core.artifact import write_manifest
    from mk.core.dataset import save_split

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [r for r in (encode_pair(tok, p, c, max_length) for p, c in pairs) if r][:sum(sizes)]
    assert len(rows) == sum(sizes), f"only {len(rows)} pairs fit in {max_length} tokens"
    out.mkdir(parents=True)
    start = 0
    for split, n in zip(("train", "val", "test"), sizes):
        save_split(out, split, split_arrays(rows[start:start + n], max_length, pad))
        start += n
    tok.save_pretrained(str(out))
    labels = sorted({c for _, c in pairs}) if answers else []
    write_manifest(out, kind="dataset", format="safetensors", task="text-generation", labels=labels,
                   max_length=max_length, splits=dict(zip(("train", "val", "test"), sizes)),
                   generation={"chat_template": True, "packed": False, "max_length": max_length,
                               "recipe": "instruct" if answers else None, "prompt_column": "prompt",
                               "completion_column": "completion", "messages_column": None})
    return out


def tweet_pairs(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Tweets as sentiment instructions, labels interleaved so every split holds each."""
    by_label: dict[str, list[str]] = {}
    for text, label in rows:
        by_label.setdefault(label, []).append(" ".join(text.split()))
    labels = sorted(by_label)
    return [(INSTRUCTION + by_label[l][i], l) for i in range(min(map(len, by_label.values()))) for l in labels]
