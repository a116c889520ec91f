"""Causal LMs for `mk tune`: next-token loss on the completion tokens of a
text-generation dataset (labels -100 elsewhere), evaluated by loss and
perplexity, and by exact match of greedy answers when the dataset's rows have
answers (see the contract in the README's causal-LM section).

The LM head runs only at the positions whose next token is a label
(`logits_to_keep`, a transformers parameter): with prompts masked, most
positions predict nothing the loss counts, and the head (vocabulary × hidden)
is a large share of a small model's work.
"""

from __future__ import annotations

import math

import numpy as np

from mk.core.artifact import Artifact, require_task
from mk.core.console import progress
from mk.core.dataset import num_rows
from mk.core.errors import BadInput
from mk.core.tokenizer_match import check_same_tokenizer, has_tokenizer
from mk.core.training.task import base_model, evaluating

TASK = "text-generation"
IGNORE = -100
DEFAULT_LORA = 16  # rank on every attention and MLP projection (lora.TARGETS)


def causal_batch(split: dict, idx: np.ndarray, device, keep_positions: bool):
    """Rows `idx` as (model inputs, target token ids), cut to their longest sequence.
    With `keep_positions`, only the positions whose next token is a label are
    scored (`logits_to_keep`) and the targets are those next tokens; otherwise
    every position is, and the targets are the labels shifted by one."""
    import torch

    mask = split["attention_mask"][idx]
    width = max(int(mask.sum(axis=1).max()), 2)
    ids, labels = split["input_ids"][idx, :width], split["labels"][idx, :width]
    nxt = labels[:, 1:]
    keep = np.flatnonzero((nxt != IGNORE).any(axis=0)) if keep_positions else np.arange(width - 1)
    if not len(keep):  # no label in these rows: one position, fully ignored, keeps the graph whole
        keep = np.array([0])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long().to(device, non_blocking=True)  # noqa: E731
    feed = {"input_ids": t(ids), "attention_mask": t(mask[:, :width]), "use_cache": False}
    if keep_positions:
        feed["logits_to_keep"] = t(keep)
    return feed, t(nxt[:, keep])


def token_nll_sum(logits, targets):
    """Summed next-token negative log-likelihood over the targets that are not -100."""
    import torch.nn.functional as F

    if logits.shape[1] != targets.shape[1]:  # every position scored: the last one predicts nothing
        logits = logits[:, :targets.shape[1]]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def label_tokens(split: dict, idx) -> int:
    """The tokens the loss counts in rows `idx` (each is the next token of some position)."""
    return int((split["labels"][idx, 1:] != IGNORE).sum())


class CausalLMTask:
    """A causal LM on a text-generation dataset: LoRA by default (rank 16)."""

    name = TASK
    select = ("loss", False)
    default_lora = DEFAULT_LORA
    teacher_art = None

    def __init__(self, dataset: Artifact, base: Artifact, opts):
        require_task(base, (TASK,), f"mk tune on the {TASK} dataset {dataset.path}")
        for option, given in (("--teacher", opts.teacher), ("--new-head", opts.new_head)):
            if given:
                raise BadInput(f"{option} applies to classifiers; {base.path} is a causal LM")
        self.dataset, self.base, self.opts = dataset, base, opts
        self.labels: list[str] = []                # a causal LM predicts tokens, not labels
        self.answers = bool(dataset.labels)        # rows with answers: exact match is measured
        self.tokenizer = check_same_tokenizer(dataset, base.path)
        self.device, self.keep_positions = "cpu", False

    def load_model(self, device: str, seed: int):
        import inspect

        import torch

        from mk.core.runtime.causal_runtime import load_causal_lm

        torch.manual_seed(seed)
        model = load_causal_lm(self.base.path, dtype=torch.float32)  # fp32 master weights; autocast does the rest
        self.device = device
        self.keep_positions = "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
        return model

    def check_splits(self, model, splits: dict[str, dict | None]) -> None:
        cfg = base_model(model).config
        vocab, positions = cfg.vocab_size, getattr(cfg, "max_position_embeddings", None)
        for name, split in splits.items():
            if split is None:
                continue
            where = f"{self.dataset.path}: {name} split"
            ids, labels = split["input_ids"], split["labels"]
            if labels.ndim != 2 or labels.shape != ids.shape or "attention_mask" not in split:
                raise BadInput(f"{where} is not a text-generation split (labels must be a token id, or -100, "
                               "per position)", hint="make it with `mk prep --task generate`")
            top = max(int(ids.max(initial=0)), int(labels.max(initial=0)))
            if top >= vocab:
                raise BadInput(f"{where} holds token id {top}, beyond the model's vocabulary of {vocab}",
                               hint="prepare the data with the model's tokenizer")
            if positions and ids.shape[1] > positions:
                raise BadInput(f"{where}: sequences of {ids.shape[1]} tokens exceed the model's context of "
                               f"{positions}", hint=f"prepare the data with --max-length {positions}")
            if self.answers and name != "train" and "prompt_lengths" not in split:
                raise BadInput(f"{where} has no prompt_lengths, so its answers cannot be generated",
                               hint="make it with `mk prep --task generate`")
        if label_tokens(splits["train"], slice(None)) == 0:
            raise BadInput(f"{self.dataset.path}: train split has no completion tokens to learn from "
                           "(every label is -100)")

    def weight(self, split: dict, idx: np.ndarray) -> int:
        return max(label_tokens(split, idx), 1)

    def loss_sum(self, runner, split: dict, idx: np.ndarray, autocast):
        feed, targets = causal_batch(split, idx, self.device, self.keep_positions)
        with autocast():
            logits = runner(**feed).logits
        return token_nll_sum(logits, targets)

    def evaluate(self, model, split: dict, autocast, description: str) -> dict:
        import torch

        total, tokens, n, bs = 0.0, 0, num_rows(split), self.opts.batch_size
        with evaluating(model), torch.inference_mode(), progress(description, total=n) as bar:
            for start in range(0, n, bs):
                idx = np.arange(start, min(start + bs, n))
                feed, targets = causal_batch(split, idx, self.device, self.keep_positions)
                with autocast():
                    logits = model(**feed).logits
                total += float(token_nll_sum(logits, targets))
                tokens += int((targets != IGNORE).sum())
                bar.advance(len(idx))
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "n": n, "tokens": tokens}

    def test(self, model, split: dict, autocast) -> dict:
        metrics = {**self.evaluate(model, split, autocast, "test"), "split": "test"}
        rows = min(self.opts.exact_match_rows, num_rows(split))
        if self.answers and rows:
            with evaluating(model), autocast():
                metrics.update(self.exact_match(model, split, rows))
        return metrics

    def exact_match(self, model, split: dict, rows: int) -> dict:
        """Exact match of greedy answers to the first `rows` test prompts, by the
        runtime `mk bench` and `mk serve` use (the contract's rule)."""
        from mk.core.runtime.causal_runtime import CausalLM, load_tokenizer

        tok = load_tokenizer(self.base.path if has_tokenizer(self.base.path) else self.dataset.path)
        lm = CausalLM(base_model(model), tok, self.device)
        with progress("exact match", total=rows) as bar:
            result = lm.exact_match({k: v[:rows] for k, v in split.items()}, self.opts.batch_size, bar.advance)
        return {"exact_match": result["exact_match"], "exact_match_n": rows, "exact_match_of": num_rows(split)}

    def describe(self, metrics: dict) -> str:
        text = f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
        if "exact_match" in metrics:
            text += (f", exact match {metrics['exact_match']:.4f} ({metrics['exact_match_n']} of "
                     f"{metrics['exact_match_of']} rows)")
        return text
