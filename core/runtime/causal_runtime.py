"""A causal LM behind one interface: encode prompts (chat template or raw text),
generate with transformers' own `generate` (KV cache, greedy or sampling, stop
strings), and report each step's new tokens as they come.

`mk tune` (exact match), `mk bench` (prefill, time to first token, decode
speed) and `mk serve` (the OpenAI-compatible routes, streaming) all generate
through `CausalLM.generate`, so the figures of one are what the others run at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mk.core.artifact import Artifact, require_task
from mk.core.device import resolve_device
from mk.core.errors import BadInput, library_error

TASK = "text-generation"


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy; `ignore_eos` generates exactly
    `max_new_tokens` (benchmarks compare equal work)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Generated:
    """What `generate` returns per batch: each row's new token ids and text (cut
    before the first stop string), why it ended, and the step times."""

    tokens: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]        # "stop" (EOS or a stop string) or "length"
    prompt_tokens: list[int]
    first_token_s: float = 0.0       # prefill: from the call to the first new token
    step_s: list[float] = field(default_factory=list)  # each later token's gap


def load_causal_lm(path, dtype=None):
    """AutoModelForCausalLM from a folder, quietly and offline; an unmerged LoRA
    adapter (`mk tune --no-merge`) loads onto its base model."""
    import transformers
    from safetensors import SafetensorError

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        from mk.core.runtime import adapters
        if adapters.is_adapter(path):
            return adapters.load_adapter_classifier(path, transformers.AutoModelForCausalLM, **kwargs)
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, **kwargs)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise library_error(e, path, "cannot load the causal LM") from None


def load_tokenizer(path):
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise library_error(e, path, "cannot load the tokenizer") from None
    if tok.pad_token_id is None:  # Llama-style tokenizers have none; padding reuses EOS
        tok.pad_token = tok.eos_token
    return tok


class _Steps:
    """A transformers streamer that records when each new token arrives and hands
    it on: `generate` calls put() first with the prompt, then once per step."""

    def __init__(self, on_tokens):
        self.on_tokens = on_tokens
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.on_tokens is not None:
            self.on_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        """Called by `generate` when it is done; every step was recorded by put()."""


def stop_at(text: str, stop) -> int | None:
    """Where `text` is cut: before the earliest of the stop strings it contains."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return min(cuts) if cuts else None


class _RowEnds:
    """A stopping criterion (transformers calls it after each step with the ids so
    far): per row, whether it has its budget of new tokens, was cancelled, or its
    new text holds a stop string. (transformers' own `stop_strings` builds tables
    over the whole vocabulary at each call: 0.1-0.5 s on SmolLM2's 49k tokens, a
    request's worth of time, where decoding the rows costs microseconds a step.)"""

    def __init__(self, width: int, limits: list[int], cancelled=None, stop=(), decode=None):
        self.width, self.limits, self.cancelled, self.stop, self.decode = width, limits, cancelled, stop, decode

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        made = input_ids.shape[1] - self.width
        gone = self.cancelled() if self.cancelled is not None else ()
        done = [made >= limit or i in gone for i, limit in enumerate(self.limits)]
        if self.stop:
            done = [d or stop_at(self.decode(row[self.width:].tolist()), self.stop) is not None
                    for d, row in zip(done, input_ids)]
        return torch.tensor(done, device=input_ids.device)


class CausalLM:
    """A causal LM and its tokenizer. The constructor takes them in memory (`mk tune`
    evaluates what it trains); `CausalLM.load` reads an artifact."""

    name = "torch"

    def __init__(self, model, tokenizer, device: str, threads: int | None = None,
                 artifact: Artifact | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.model, self.tokenizer, self.device, self.artifact = model, tokenizer, str(device), artifact
        config = getattr(model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.vocab_size = int(getattr(config, "vocab_size", 0) or len(tokenizer))

    @classmethod
    def load(cls, art: Artifact, device: str = "auto", threads: int | None = None) -> "CausalLM":
        require_task(art, (TASK,), "this step")
        device = resolve_device(device)
        model = load_causal_lm(art.path).to(device).eval()
        return cls(model, load_tokenizer(art.path), device, threads, art)

    # -- prompts ------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation with the assistant's turn opened."""
        if not self.has_chat_template:
            raise BadInput("this model's tokenizer has no chat template, so it cannot take chat messages",
                           hint="send a plain prompt (/v1/completions, or a prompt column) instead")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if self.context_length and prompt_len + max_new_tokens > self.context_length:
            raise BadInput(f"the prompt ({prompt_len} tokens) and {max_new_tokens} new tokens exceed the "
                           f"model's context of {self.context_length} tokens",
                           hint="shorten the prompt or ask for fewer new tokens")

    # -- generation ---------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: Sampling, on_tokens=None,
                 max_new: list[int] | None = None, cancelled=None) -> Generated:
        """Generate for a batch of prompts (left-padded together). `on_tokens(ids)`
        is called from this thread with one new id per row at each step.

        `max_new` gives each row its own budget (instead of `sampling.max_new_tokens`)
        and `cancelled()` the set of rows no longer wanted, so that requests asking
        for different lengths share a batch (`mk serve`); a row that is done gets
        padding while the others go on, and the batch ends when all are done."""
        import torch
        from transformers import StoppingCriteriaList

        limits = max_new or [sampling.max_new_tokens] * len(prompts)
        for ids, limit in zip(prompts, limits):
            if not ids:
                raise BadInput("an empty prompt: nothing to continue from")
            self.check_fits(len(ids), limit)
        tok = self.tokenizer
        pad = tok.pad_token_id
        input_ids, mask = self._left_padded(prompts)
        width = input_ids.shape[1]
        steps = _Steps(on_tokens)
        kwargs = dict(max_new_tokens=max(limits), pad_token_id=pad, streamer=steps)
        if max_new is not None or cancelled is not None or sampling.stop:
            ends = _RowEnds(width, limits, cancelled, tuple(s for s in sampling.stop if s), self.decode)
            kwargs["stopping_criteria"] = StoppingCriteriaList([ends])
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = max(limits)
        if sampling.temperature > 0:
            kwargs |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                       "top_k": 0}
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        new = [row[:limit] for row, limit in zip(out[:, width:].tolist(), limits)]
        result = self._finish(new, sampling, [len(ids) for ids in prompts])
        if steps.times:
            result.first_token_s = steps.times[0] - t0
            result.step_s = [b - a for a, b in zip(steps.times, steps.times[1:])]
        return result

    def _left_padded(self, prompts: list[list[int]]):
        """(input_ids, attention_mask) tensors of prompts left-padded to the longest."""
        import torch

        width, pad = max(len(ids) for ids in prompts), self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.device)
        return input_ids, mask

    def prefill(self, prompts: list[list[int]]) -> float:
        """Seconds of one forward pass over the prompts, padded as `generate` pads them,
        to the last position's logits with the KV cache filled: the work `generate`
        does before its first token, without the sampling and bookkeeping around it."""
        import torch

        for ids in prompts:
            self.check_fits(len(ids), 1)
        input_ids, mask = self._left_padded(prompts)
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            self.model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            sync()
            return time.perf_counter() - t0

    def _finish(self, rows: list[list[int]], sampling: Sampling, prompt_tokens: list[int]) -> Generated:
        """Cut each row at its end: EOS (unless ignored) or the first stop string."""
        eos = self.eos_ids
        tokens, texts, reasons = [], [], []
        for row in rows:
            reason = "length"
            if not sampling.ignore_eos:
                for i, t in enumerate(row):
                    if t in eos:
                        row, reason = row[:i], "stop"
                        break
            text = self.decode(row)
            cut = stop_at(text, sampling.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
            tokens.append(row)
            texts.append(text)
            reasons.append(reason)
        return Generated(tokens, texts, reasons, prompt_tokens)

    # -- quality on a generation dataset's split (llm-contract.md) ----------------

    def perplexity(self, split: dict, batch_size: int = 8) -> dict:
        """exp(mean token NLL) over the label tokens (labels != -100) of a split's
        rows, each token weighted alike whatever its row's length."""
        import math

        import torch
        import torch.nn.functional as F

        nll, count = 0.0, 0
        for start in range(0, len(split["input_ids"]), batch_size):
            rows = slice(start, start + batch_size)
            mask = torch.as_tensor(split["attention_mask"][rows].astype("int64"))
            width = int(mask.sum(dim=1).max())  # right-padded rows: cut the common padding
            ids = torch.as_tensor(split["input_ids"][rows][:, :width].astype("int64"), device=self.device)
            labels = torch.as_tensor(split["labels"][rows][:, :width].astype("int64"), device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask[:, :width].to(self.device)).logits
            # position t predicts token t+1
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
        if not count:
            raise BadInput("the split has no completion tokens (every label is -100): no perplexity")
        return {"perplexity": math.exp(nll / count), "loss": nll / count, "tokens": count}

    def exact_match(self, split: dict, batch_size: int = 8, advance=None) -> dict:
        """Greedy answers to each row's prompt (input_ids[:prompt_length]) against its
        reference completion, both stripped and lower-cased; new tokens allowed: the
        longest reference + 4. `advance(n)` is told of each batch done (progress)."""
        prompts, refs = [], []
        for ids, labels, n in zip(split["input_ids"], split["labels"], split["prompt_lengths"]):
            if n <= 0:
                raise BadInput("a row without a prompt (a packed row?): exact match needs one example a row")
            prompts.append([int(t) for t in ids[:n]])
            refs.append([int(t) for t in labels if t != -100])
        sampling = Sampling(max_new_tokens=max(len(r) for r in refs) + 4)
        hits = 0
        for start in range(0, len(prompts), batch_size):
            out = self.generate(prompts[start:start + batch_size], sampling)
            for text, ref in zip(out.texts, refs[start:start + batch_size]):
                hits += text.strip().lower() == self.decode(ref).strip().lower()
            if advance is not None:
                advance(len(out.texts))
        return {"exact_match": hits / len(prompts), "rows": len(prompts)}

    @property
    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def decode(self, ids: list[int]) -> str:
        """The text of new tokens (what `generate` returns, and what a stream shows)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict:
        return {"runtime": self.name, "device": self.device, "threads": self.threads}
