"""`mk explain`: which words made a classifier decide, for texts or a dataset split.

`explain()` checks everything it can before loading the model (the method against
the artifact's format, the target label, every text), then explains each text with
one method, optionally runs the deletion check, and summarises the words with the
largest mean score per explained class.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mk.core.artifact import Artifact, open_artifact
from mk.core.console import log, progress
from mk.core.errors import BadInput
from mk.core.explanation import methods
from mk.core.explanation.words import Encoded, decode_rows, encode, require_fast
from mk.core.tokenizer_match import has_tokenizer, load_tokenizer

SCHEMA = "mk.explain/1"
RANDOM_DRAWS = 10       # random deletions averaged per text in the deletion check
SUMMARY_WORDS = 10      # words per class in the summary
SUMMARY_MIN_COUNT = 2   # a word must occur this often in a class to be summarised


@dataclass
class Settings:
    method: str | None = None      # default: ig for torch models, occlusion otherwise
    target: str | None = None      # a label name; default: each text's predicted class
    steps: int = 50                # ig
    samples: int = 200             # shap, lime
    batch_size: int = 32
    max_length: int | None = None  # default: the model's positions, at most 512
    seed: int = 0
    faithfulness: bool = False
    top_k: int = 3
    device: str = "auto"
    threads: int | None = None
    trust_pickle: bool = False


@dataclass
class Rows:
    """Where the texts come from: given texts, or a dataset split."""

    texts: list[str] | None = None
    data: Path | None = None
    split: str = "test"
    limit: int | None = None
    errors: bool = False


def check_model(art: Artifact, settings: Settings) -> tuple[str, int | None]:
    """The method to use and the target's index, or exit 2 before any loading."""
    if art.task != "text-classification" or not art.labels:
        raise BadInput(f"{art.path}: has no text classification head (task {art.task!r})",
                       hint="fine-tune it first: mk tune DATA --model MODEL -o tuned")
    method = settings.method or ("ig" if art.format == "safetensors" else "occlusion")
    if method not in methods.METHODS:
        raise BadInput(f"--method {method}: unknown method; choose {', '.join(methods.METHODS)}")
    if method in methods.NEEDS_TORCH and art.format != "safetensors":
        parent = next((a.path for a, _ in art.lineage()[1:] if a is not None and a.format == "safetensors"), None)
        kind = {"onnx": "an ONNX", "tensorrt": "a TensorRT"}.get(art.format, f"a {art.format}")
        raise BadInput(f"--method {method}: needs a torch model's internals; {art.path} is {kind} model",
                       hint="use --method occlusion, shap or lime"
                            + (f", or explain its torch parent {parent}" if parent else ""))
    target = None
    if settings.target is not None:
        if settings.target not in art.labels:
            raise BadInput(f"--target {settings.target}: not a label of {art.path} "
                           f"(labels: {', '.join(art.labels)})")
        target = art.labels.index(settings.target)
    return method, target


def max_length_of(art: Artifact, requested: int | None) -> int:
    positions = int(art.config().get("max_position_embeddings") or 512)
    return min(requested or 512, positions)


def load(art: Artifact, method: str, settings: Settings):
    """(torch model or None, runtime): a torch model also runs behind TorchRuntime."""
    from mk.core.runtime import load_runtime

    if art.format != "safetensors":
        return None, load_runtime(art, settings.device, settings.threads)
    from mk.core.device import resolve_device
    from mk.core.runtime.torch_runtime import TorchRuntime, load_classifier

    device = resolve_device(settings.device)
    model = load_classifier(art.path, art.task).to(device).eval()
    if method == "attention":
        model.set_attn_implementation("eager")  # SDPA kernels return no attention weights
    return model, TorchRuntime(model, device, settings.threads, art)


def dataset_texts(art: Artifact, tok, rows: Rows, runtime, batch_size: int) -> tuple[list[str], list[int]]:
    """A split's rows as text (decoded with the tokenizer) and their true labels; with
    rows.errors only those the model gets wrong; the first rows.limit of them."""
    from mk.core.dataset import check_labels, dataset_for, load_split
    from mk.core.tokenizer_match import check_same_tokenizer

    dataset = dataset_for(art, rows.data)
    check_same_tokenizer(dataset, art.path)
    check_labels(art, dataset)
    split = load_split(dataset, rows.split)
    if "input_ids" not in split:
        raise BadInput(f"{dataset.path}: an image dataset; mk explain explains texts")
    if "token_type_ids" in split and split["token_type_ids"].any():
        raise BadInput(f"{dataset.path}: sentence pairs; mk explain explains single texts")
    chosen = np.arange(len(split["labels"]))
    if rows.errors:
        from mk.core.evaluation import predict

        preds = predict(runtime, split, batch_size, description="finding errors").argmax(axis=-1)
        chosen = chosen[preds != split["labels"]]
    chosen = chosen[:rows.limit] if rows.limit else chosen
    texts = decode_rows(tok, split["input_ids"][chosen], split["attention_mask"][chosen])
    return texts, [int(split["labels"][i]) for i in chosen]


def deletion_check(scorer, enc: Encoded, scores: np.ndarray, target: int, pad_id: int, k: int,
                   rng: np.random.Generator) -> dict:
    """The target's probability with the k top-scored words removed, against k random words
    removed (the mean of RANDOM_DRAWS draws): a faithful ranking lowers it more."""
    n = len(enc.words)
    k = min(k, n)
    removals = [np.argsort(-scores, kind="stable")[:k]] + [rng.choice(n, k, replace=False) for _ in range(RANDOM_DRAWS)]
    pieces = enc.feature_mask()
    keep = np.stack([~np.isin(pieces, removed) for removed in removals])
    full = scorer.probabilities(enc.input_ids[None], enc.attention_mask[None])[0, target]
    probs = scorer.without_words(enc, keep, pad_id)[:, target]
    return {"k": int(k), "probability": float(full), "without_top": float(probs[0]),
            "without_random": float(probs[1:].mean()), "drop_top": float(full - probs[0]),
            "drop_random": float(full - probs[1:].mean())}


def explain_one(enc: Encoded, method: str, model, scorer, target: int, pad_id: int, settings: Settings) -> dict:
    """Word scores (and token scores, completeness where the method has them)."""
    out: dict = {"token_scores": None}
    if method == "ig":
        scores, token_scores, out["completeness"] = methods.integrated_gradients(
            model, enc, target, pad_id, settings.steps, settings.batch_size)
        out["token_scores"] = token_scores.tolist()
    elif method == "attention":
        scores, token_scores = methods.attention_rollout(model, enc)
        out["token_scores"] = token_scores.tolist()
    else:
        scores = methods.perturbation(method, scorer, enc, target, pad_id, settings.samples, settings.seed)
    out["scores"] = scores
    return out


def record(i: int, enc: Encoded, probs: np.ndarray, target: int, labels: list[str], method: str,
           result: dict, true_label: int | None) -> dict:
    words = [{"word": w["word"], "start": w["start"], "end": w["end"], "tokens": w["tokens"], "score": float(s)}
             for w, s in zip(enc.words, result["scores"])]
    pred = int(probs.argmax())
    rec = {"kind": "explanation", "index": i, "text": enc.text, "method": method,
           "prediction": labels[pred], "score": float(probs[pred]), "target": labels[target],
           "target_probability": float(probs[target]),
           "probabilities": {l: float(p) for l, p in zip(labels, probs)},
           "words": words, "tokens": enc.tokens, "token_scores": result["token_scores"],
           "truncated": enc.truncated}
    if true_label is not None:
        rec["label"], rec["correct"] = labels[true_label], pred == true_label
    for key in ("completeness", "faithfulness"):
        if key in result:
            rec[key] = result[key]
    return rec


def word_summary(records: list[dict]) -> dict[str, list[dict]]:
    """Per explained class, the words (lower-cased) with the largest mean score."""
    by_class: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        words = by_class.setdefault(rec["target"], {})
        for w in rec["words"]:
            words.setdefault(w["word"].lower(), []).append(w["score"])
    summary = {}
    for label, words in by_class.items():
        rows = [{"word": w, "mean_score": float(np.mean(s)), "count": len(s)}
                for w, s in words.items() if len(s) >= SUMMARY_MIN_COUNT]
        summary[label] = sorted(rows, key=lambda r: -r["mean_score"])[:SUMMARY_WORDS]
    return summary


def faithfulness_summary(records: list[dict]) -> dict | None:
    checks = [r["faithfulness"] for r in records if "faithfulness" in r]
    if not checks:
        return None
    top = np.array([c["drop_top"] for c in checks])
    rand = np.array([c["drop_random"] for c in checks])
    return {"texts": len(checks), "mean_drop_top": float(top.mean()), "mean_drop_random": float(rand.mean()),
            "share_top_above_random": float(np.mean(top > rand))}


def explain(model: str | Path, rows: Rows, settings: Settings | None = None) -> dict:
    """Explain every text of `rows` with one method; see the module's docstring."""
    settings = settings or Settings()
    start = time.perf_counter()
    art = open_artifact(model, kind="model", trust_pickle=settings.trust_pickle)
    method, fixed_target = check_model(art, settings)
    if not has_tokenizer(art.path):
        raise BadInput(f"{art.path}: no tokenizer files beside the model")
    tok = load_tokenizer(art.path)
    require_fast(tok, art.path)
    max_length = max_length_of(art, settings.max_length)
    if rows.texts is not None and not rows.texts:
        raise BadInput("no texts to explain", hint="pass texts as arguments, pipe them one per line, or pass --data")
    encoded = [encode(tok, t, max_length, where=f"text {i + 1}") for i, t in enumerate(rows.texts or [])]
    model_, runtime = load(art, method, settings)
    true_labels: list[int | None] = [None] * len(encoded)
    if rows.texts is None:
        texts, labels = dataset_texts(art, tok, rows, runtime, settings.batch_size)
        encoded = [encode(tok, t, max_length, where=f"{rows.split} row {i + 1}") for i, t in enumerate(texts)]
        true_labels = list(labels)
    if not encoded:
        raise BadInput("no texts to explain" + (" (the model gets every row right)" if rows.errors else ""))
    scorer = methods.Scorer(runtime, settings.batch_size)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    rng = np.random.default_rng(settings.seed)
    records, warnings = [], []
    with progress(f"explaining ({method})", total=len(encoded)) as bar:
        for i, enc in enumerate(encoded):
            probs = scorer.probabilities(enc.input_ids[None], enc.attention_mask[None])[0]
            target = fixed_target if fixed_target is not None else int(probs.argmax())
            result = explain_one(enc, method, model_, scorer, target, pad_id, settings)
            if settings.faithfulness:
                result["faithfulness"] = deletion_check(scorer, enc, result["scores"], target, pad_id,
                                                        settings.top_k, rng)
            records.append(record(i, enc, probs, target, art.labels, method, result, true_labels[i]))
            bar.advance(1)
    bad = [r["index"] + 1 for r in records if not r.get("completeness", {"ok": True})["ok"]]
    if bad:
        warnings.append(f"ig: attributions miss the logit difference by more than "
                        f"{methods.COMPLETENESS_TOLERANCE:.0%} for {len(bad)} of {len(records)} texts "
                        f"(e.g. text {bad[0]}); try --steps {settings.steps * 4}")
    for w in warnings:
        log.warning(w)
    return {"schema": SCHEMA, "model": str(art.path), "format": art.format, "labels": art.labels,
            "method": method, "settings": {**asdict(settings), "method": method, "max_length": max_length},
            "runtime": runtime.describe(), "records": records, "summary": word_summary(records),
            "faithfulness": faithfulness_summary(records), "warnings": warnings,
            "seconds": time.perf_counter() - start, "runtime_calls": scorer.calls}
