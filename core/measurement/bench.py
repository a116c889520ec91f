"""`mk bench` offline: measure model artifacts of any format side by side.

Every artifact is loaded through the one runtime interface (`core/runtime`), so
the numbers are the ones `mk serve` and the accuracy gates run at. What makes
them trustworthy:

- warm-up calls before anything is timed, and CUDA synchronisation around calls;
- one fixed thread count for every runtime, reported in the result;
- artifacts measured interleaved, in rounds (A B A B …), so that drift in the
  machine (turbo, thermal, a neighbour's load) hits all of them alike;
- medians over rounds with their spread, and speed-ups as the median of
  per-round ratios between artifacts measured moments apart.

The result is a JSON-able dict of schema `mk.bench/1` (README: "mk bench").
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mk.core import __version__
from mk.core.artifact import Artifact, created_by, open_artifact
from mk.core.cpu import int8_path_mismatch, this_cpu
from mk.core.console import log, progress
from mk.core.device import check_device, default_threads
from mk.core.errors import BadInput, MkError, first_line

SCHEMA = "mk.bench/1"
# A variant must beat its parent by more than this ratio to count as faster:
# below it the difference is within what repeated runs of one model scatter.
NOISE = 1.05
SETTLE_S = 0.05  # pause between artifacts' blocks: OpenMP / ORT worker threads spin a while after a call
DATA = "data"  # the --seq-lens entry that means real inputs from the dataset
CAUSAL = "text-generation"
IMAGE = "image-classification"  # measured on real images only: an image has no length to vary
DEFAULTS = {
    "encoder": {"batch_sizes": [1, 8, 32], "seq_lens": [128], "rounds": 5, "warmup": 3},
    CAUSAL: {"batch_sizes": [1, 8], "seq_lens": [128, 512], "rounds": 3, "warmup": 1, "eval_limit": 100,
             "new_tokens": 32},
}


# ---------------------------------------------------------------- settings ---

@dataclass
class Settings:
    """What to measure. A None is the default of the models' task (`DEFAULTS`)."""

    batch_sizes: list[int] | None = None
    seq_lens: list | None = None   # ints, or DATA for real inputs; prompt lengths for causal LMs
    device: str = "auto"
    threads: int | None = None
    duration: float | None = None  # measured seconds per artifact and shape
    iters: int | None = None       # or measured calls per artifact and shape
    rounds: int | None = None
    warmup: int | None = None
    data: Path | None = None
    eval_limit: int | None = None  # test rows for accuracy; 0 skips it
    seed: int = 0
    trust_pickle: bool = False     # allow pytorch_model.bin (it can run code when loaded)
    new_tokens: int | None = None  # causal LMs: tokens generated per call (greedy, EOS ignored)

    def resolved(self, task: str) -> "Settings":
        """These settings with every None given its task's default (a generation
        call costs seconds on a CPU: fewer rounds, fewer shapes, bounded rows)."""
        from dataclasses import replace

        d = dict(DEFAULTS[CAUSAL if task == CAUSAL else "encoder"])
        if task != CAUSAL and (self.data is not None or task == IMAGE):
            d["seq_lens"] = [DATA]
        return replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})

    def per_round(self) -> tuple[int | None, float | None]:
        """(calls, seconds) each artifact gets in each round."""
        if self.iters is not None:
            return max(1, math.ceil(self.iters / self.rounds)), None
        return None, (self.duration if self.duration is not None else 3.0) / self.rounds


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise BadInput(f"{option} {text!r}: expected a comma-separated list of whole numbers, like 1,8,32") from None
    if not values:
        raise BadInput(f"{option} {text!r}: expected a comma-separated list of whole numbers, like 1,8,32")
    if any(v < 1 for v in values):
        raise BadInput(f"{option} {text!r}: every value must be at least 1")
    return list(dict.fromkeys(values))


def parse_seq_lens(text: str) -> list:
    """`128,512` or `data` (real inputs from the dataset), or both: `128,data`."""
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    out = []
    for p in parts:
        if p.lower() == DATA:
            out.append(DATA)
        else:
            out.extend(parse_ints(p, "--seq-lens"))
    if not out:
        raise BadInput(f"--seq-lens {text!r}: expected lengths like 128, or `data` for real inputs")
    return list(dict.fromkeys(out))


# ------------------------------------------------------------- statistics ---

def percentiles(seconds: list[float]) -> dict:
    """Latency summary in milliseconds."""
    if not seconds:
        return {k: None for k in ("p50", "p90", "p99", "mean", "min", "max")}
    a = np.asarray(seconds) * 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": _r(p50), "p90": _r(p90), "p99": _r(p99), "mean": _r(a.mean()),
            "min": _r(a.min()), "max": _r(a.max())}


def spread(values: list[float]) -> dict:
    """Median of repeats with its range; spread_pct = (max - min) / median."""
    if not values:
        return {"median": None, "min": None, "max": None, "spread_pct": None}
    a = np.asarray(values, dtype=float)
    med = float(np.median(a))
    return {"median": _r(med), "min": _r(a.min()), "max": _r(a.max()),
            "spread_pct": _r(100.0 * (a.max() - a.min()) / med) if med else None}


def ratio(numerators: list[float], denominators: list[float]) -> dict:
    """Median and range of per-round ratios (rounds measured moments apart)."""
    pairs = [n / d for n, d in zip(numerators, denominators) if d]
    if not pairs:
        return {"median": None, "min": None, "max": None}
    a = np.asarray(pairs)
    return {"median": _r(np.median(a), 3), "min": _r(a.min(), 3), "max": _r(a.max(), 3)}


def _r(x, digits: int = 4):
    return None if x is None else float(f"{float(x):.{digits + 2}g}")


# ----------------------------------------------------------------- memory ---

class PeakRSS:
    """Peak resident memory of this process over a stretch of time.

    On Linux the kernel's own high-water mark (VmHWM) is reset through
    /proc/self/clear_refs and read back, which catches the transient peak inside
    a forward pass at no cost; elsewhere psutil's RSS is sampled after calls."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self._hwm = self._can_reset()
        self.peak = 0

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _vmhwm() is not None
        except OSError:
            return False

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def start(self) -> int:
        if self._hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        now = self.rss()
        self.peak = now
        return now

    def sample(self) -> None:
        if not self._hwm:
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        if self._hwm:
            self.peak = max(self.peak, _vmhwm() or 0)
        else:
            self.sample()
        return self.peak


def _vmhwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- inputs ----

def vocab_size(art: Artifact) -> int | None:
    """The model's vocabulary size from config.json or its tokenizer files."""
    import json

    if isinstance(v := art.config().get("vocab_size"), int):
        return v
    try:
        vocab = json.loads((art.path / "tokenizer.json").read_text())["model"]["vocab"]
        return len(vocab)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no usable tokenizer.json: a WordPiece vocab.txt, below, may still tell
    try:
        return sum(1 for _ in (art.path / "vocab.txt").open(encoding="utf-8"))
    except OSError:
        return None


def max_positions(art: Artifact) -> int | None:
    v = art.config().get("max_position_embeddings")
    return v if isinstance(v, int) else None


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids drawn from the vocabulary (past the reserved low ids), full attention."""
    rng = np.random.default_rng(seed + 1000 * batch + seq)
    low = min(1000, vocab // 2)
    ids = rng.integers(low, vocab, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64)}


def data_batches(split: dict[str, np.ndarray], batch: int, limit: int = 8) -> list[dict[str, np.ndarray]]:
    """Up to `limit` batches of real test rows (wrapping around a small split),
    each cut to its longest real sequence, as `mk serve` would receive them."""
    from mk.core.dataset import trim_padding

    n = len(split["labels"])
    keys = [k for k in split if k != "labels"]
    out = []
    for b in range(min(limit, max(1, math.ceil(n / batch)))):
        idx = np.arange(b * batch, (b + 1) * batch) % n
        out.append(trim_padding({k: split[k][idx] for k in keys}))
    return out


def _tokens(batches: list[dict]) -> tuple[float | None, float | None]:
    """(mean real tokens per sample, mean padded width) of a list of batches."""
    if "attention_mask" not in batches[0]:
        return None, None
    real = np.mean([b["attention_mask"].sum(axis=1).mean() for b in batches])
    width = np.mean([b["attention_mask"].shape[1] for b in batches])
    return _r(real), _r(width)


# --------------------------------------------------------------- artifacts --

@dataclass
class Entry:
    """One artifact in the run, with its runtime and what was measured of it."""

    index: int
    name: str
    art: Artifact
    runtime: object = None
    parent: int | None = None
    load_s: float | None = None
    load_rss: int | None = None
    peak_rss: int = 0
    run_rss: int = 0       # the most the process grew above its level before the runs
    gpu_peak: int | None = None

    @property
    def cuda(self) -> bool:
        return str(getattr(self.runtime, "device", "cpu")).startswith("cuda")


def open_all(paths: list[Path], trust_pickle: bool = False) -> list[Artifact]:
    """Open every artifact before loading any, so a bad one fails fast, named."""
    arts = []
    for p in paths:
        arts.append(open_artifact(p, kind="model", trust_pickle=trust_pickle))
    return arts


def unique_names(arts: list[Artifact], given: list) -> list[str]:
    """Folder names (or the name given, like `minilm`), made unique with #2, #3…"""
    names, seen = [], {}
    for art, g in zip(arts, given):
        base = Path(str(g)).name or art.path.name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def find_parents(arts: list[Artifact]) -> list[int | None]:
    """For each artifact, the nearest ancestor in its lineage that is also in the run."""
    where = {a.path.resolve(): i for i, a in enumerate(arts)}
    parents: list[int | None] = []
    for i, a in enumerate(arts):
        found = None
        try:
            chain = a.lineage()[1:]
        except MkError:  # an unreadable ancestor: no comparison, not a failure
            chain = []
        for anc, _link in chain:
            if anc is None:
                break
            j = where.get(anc.path.resolve())
            if j is not None and j != i:
                found = j
                break
        parents.append(found)
    return parents


def size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _preimport(arts: list[Artifact], device: str) -> None:
    """Import each runtime's library before anything is measured, so that load
    time and memory are the model's, not the library's."""
    formats = {a.format for a in arts}
    if "safetensors" in formats or device.startswith("cuda") or "tensorrt" in formats:
        import torch  # noqa: F401
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar is noise here
    if "onnx" in formats:
        import onnxruntime  # noqa: F401


def _named(art: Artifact, e: Exception, what: str) -> MkError:
    """An error that names the artifact (the runtime's own message kept)."""
    if isinstance(e, MkError):
        if str(art.path) not in e.message:
            e.message = f"{art.path}: {e.message}"
        return e
    return BadInput(f"{art.path}: {what} ({type(e).__name__}: {first_line(e)})")


def load(entry: Entry, device: str, threads: int, mem: PeakRSS, loader=None) -> None:
    """Load one artifact (through `loader(art, device, threads)`, by default the
    runtime its format has), timing it and the memory it takes."""
    from mk.core.runtime import load_runtime

    before = mem.rss()
    t0 = time.perf_counter()
    try:
        entry.runtime = (loader or load_runtime)(entry.art, device, threads)
    except Exception as e:  # noqa: BLE001 — every failure to load names the artifact
        raise _named(entry.art, e, "cannot be loaded") from None
    _sync(entry)
    entry.load_s = _r(time.perf_counter() - t0)
    entry.load_rss = max(0, mem.rss() - before)


def _synchronizer(entry: Entry):
    """What waits for the device's queued work: torch.cuda.synchronize on CUDA, else
    nothing. Resolved once, so the timed window holds only the call and the wait."""
    if entry.cuda and "torch" in sys.modules:
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _sync(entry: Entry) -> None:
    _synchronizer(entry)()


def _call(entry: Entry, batch: dict, shape: str) -> None:
    try:
        entry.runtime(batch)
    except Exception as e:  # noqa: BLE001 — e.g. a batch size a TensorRT profile does not allow
        raise _named(entry.art, e, f"fails at {shape}") from None


# ----------------------------------------------------------- measurement ----

def _cuda_reset(entry: Entry) -> None:
    if entry.cuda and "torch" in sys.modules:
        import torch

        torch.cuda.reset_peak_memory_stats()


def _cuda_peak(entry: Entry) -> None:
    if entry.cuda and "torch" in sys.modules:
        import torch

        if entry.runtime.name == "torch":
            used = torch.cuda.max_memory_allocated()
        else:  # ORT and TensorRT allocate outside torch: device-wide use instead
            free, total = torch.cuda.mem_get_info()
            used = total - free
        entry.gpu_peak = max(entry.gpu_peak or 0, int(used))


def measure_shape(entries: list[Entry], batches: list[dict], shape: str, settings: Settings,
                  mem: PeakRSS, bar) -> dict[int, dict]:
    """Warm up, then time every artifact on the same batches in interleaved rounds."""
    calls_per_round, seconds_per_round = settings.per_round()
    for e in entries:
        for i in range(max(1, settings.warmup)):
            _call(e, batches[i % len(batches)], shape)
        _sync(e)
    lat = {e.index: [] for e in entries}
    thr = {e.index: [] for e in entries}
    samples = {e.index: 0 for e in entries}
    sizes = [len(next(iter(b.values()))) for b in batches]
    for _ in range(settings.rounds):
        for e in entries:
            if len(entries) > 1:
                time.sleep(SETTLE_S)  # let the previous runtime's spinning worker threads go idle
            times, n_samples, k = [], 0, 0
            before = mem.start()
            _cuda_reset(e)
            sync, run_batch = _synchronizer(e), e.runtime
            round_end = None if seconds_per_round is None else time.perf_counter() + seconds_per_round
            while True:
                batch = batches[k % len(batches)]
                k += 1
                sync()
                t0 = time.perf_counter()
                run_batch(batch)
                sync()
                times.append(time.perf_counter() - t0)
                n_samples += sizes[(k - 1) % len(batches)]
                mem.sample()
                if calls_per_round is not None:
                    if k >= calls_per_round:
                        break
                elif time.perf_counter() >= round_end or k >= 100_000:
                    break
            peak = mem.stop()
            e.peak_rss = max(e.peak_rss, peak)
            e.run_rss = max(e.run_rss, peak - before)
            _cuda_peak(e)
            lat[e.index] += times
            thr[e.index].append(n_samples / sum(times))
            samples[e.index] += n_samples
            bar.advance(1, info=f"{e.name} {shape}")
    return {e.index: {"latencies": lat[e.index], "throughputs": thr[e.index], "samples": samples[e.index]}
            for e in entries}


def run(paths: list, settings: Settings, given: list | None = None) -> dict:
    """Measure every artifact; return the `mk.bench/1` result."""
    from mk.core.dataset import load_split

    if not paths:
        raise BadInput("no artifacts to measure", hint="pass artifact folders, or pipe their paths on stdin")
    check_device(settings.device)
    arts = open_all([Path(str(p)) for p in paths], settings.trust_pickle)
    names = unique_names(arts, given or paths)
    parents = find_parents(arts)
    entries = [Entry(i, n, a, parent=p) for i, (n, a, p) in enumerate(zip(names, arts, parents))]
    task = one_task(arts)
    settings = settings.resolved(task)
    if task == CAUSAL:
        from mk.core.measurement.bench_causal import run_causal

        return run_causal(entries, settings)
    if settings.new_tokens is not None:
        raise BadInput("--new-tokens: only text-generation models generate; "
                       f"{arts[0].path} is a {arts[0].task or 'non-generative'} model")
    threads = settings.threads or default_threads()
    dataset = _dataset(arts, settings, task)
    vocab = _check_shapes(arts, settings)

    _preimport(arts, settings.device)
    mem = PeakRSS()
    warnings = [w for a in arts if (w := int8_path_mismatch(a))]
    load_before = _loadavg()
    if (busy := _busy(load_before)) is not None:
        warnings.append(busy)
    for e in entries:
        log.info("loading %s (%s)", e.name, e.art.format)
        load(e, settings.device, threads, mem)

    split = None
    if dataset is not None and (DATA in settings.seq_lens or settings.eval_limit != 0):
        split = load_split(dataset, "test", limit=settings.eval_limit or None)
    shapes = [(b, s) for s in settings.seq_lens for b in settings.batch_sizes]
    results = []
    with progress("measuring", total=len(shapes) * settings.rounds * len(entries)) as bar:
        for b, s in shapes:
            batches = data_batches(split, b) if s == DATA else [synthetic_batch(b, s, vocab, settings.seed)]
            shape = f"batch {b}, seq {s}"
            log.info("measuring %s: %s", shape, ", ".join(e.name for e in entries))
            measured = measure_shape(entries, batches, shape, settings, mem, bar)
            results += _shape_rows(entries, measured, (b, s, shape), _tokens(batches), settings, warnings)

    # Accuracy after timing, so evaluation never disturbs the clocks.
    accuracy = {e.index: _accuracy(e, dataset, split, settings, warnings) for e in entries}
    if dataset is None:
        warnings.append("no dataset: accuracy not measured; pass --data DATASET")
    return {
        "schema": SCHEMA,
        "mode": "offline",
        "created": created_by(),
        "settings": {
            "batch_sizes": settings.batch_sizes, "seq_lens": settings.seq_lens,
            "device": settings.device, "threads": threads, "duration_s": settings.duration,
            "iters": settings.iters, "rounds": settings.rounds, "warmup": settings.warmup,
            "order": "interleaved", "noise_ratio": NOISE, "seed": settings.seed,
            "data": str(dataset.path) if dataset is not None else None,
        },
        "environment": {**environment(threads, settings.threads),
                        "load_average": {"before": load_before, "after": _loadavg()}},
        "artifacts": [_artifact_row(e, entries, accuracy[e.index], threads) for e in entries],
        "results": results,
        "warnings": warnings,
    }


def one_task(arts: list[Artifact]) -> str | None:
    """The task every artifact of the run shares: a causal LM and an encoder measure
    different things (tokens/s against samples/s), so one run never mixes them."""
    causal = [a for a in arts if a.task == CAUSAL]
    if causal and len(causal) < len(arts):
        other = next(a for a in arts if a.task != CAUSAL)
        raise BadInput(f"{other.path}: is a {other.task or 'non-generative'} model and {causal[0].path} a "
                       "text-generation model; mk bench compares models of one task",
                       hint="bench the causal LMs and the encoders in separate calls")
    return CAUSAL if causal else (arts[0].task if arts else None)


def _dataset(arts: list[Artifact], settings: Settings, task: str | None = None) -> Artifact | None:
    """--data, else the dataset of the first lineage that names one; checked against
    every text model's tokenizer when its rows will be fed to them (and, for causal
    LMs, to be a generation dataset)."""
    from mk.core.dataset import lineage_dataset, open_dataset

    if settings.data is not None:
        dataset = open_dataset(settings.data)
    else:
        dataset = next((d for a in arts if (d := lineage_dataset(a)) is not None), None)
    if task == CAUSAL and dataset is not None and dataset.task != CAUSAL:
        raise BadInput(f"{dataset.path}: is a {dataset.task or 'classification'} dataset; a causal LM is "
                       "measured on a text-generation dataset", hint="make one with `mk prep --task generate`")
    if DATA in settings.seq_lens and dataset is None and task == IMAGE:
        raise BadInput(f"{arts[0].path}: an image classifier is measured on real images, and no dataset is in "
                       "its lineage", hint="pass --data DATASET (made by `mk prep` from a folder of images)")
    if DATA in settings.seq_lens and dataset is None:
        raise BadInput("--seq-lens data: no dataset to take real inputs from",
                       hint="pass --data DATASET (made by `mk prep`)")
    if dataset is not None and (DATA in settings.seq_lens or settings.eval_limit != 0):
        # rows tokenized by another tokenizer give meaningless inputs and accuracies, silently
        from mk.core.tokenizer_match import check_same_tokenizer

        for a in arts:
            if a.task in ("text-classification", CAUSAL):
                check_same_tokenizer(dataset, a.path)
    return dataset


def _check_shapes(arts: list[Artifact], settings: Settings) -> int:
    """Every --seq-lens within every model's positions; the vocabulary that synthetic
    inputs may draw from (valid for every model in the run)."""
    for a in arts:
        if a.task == IMAGE and settings.seq_lens != [DATA]:
            raise BadInput(f"--seq-lens {','.join(map(str, settings.seq_lens))}: {a.path} is an image classifier; "
                           "it takes the dataset's images, not token sequences",
                           hint="leave --seq-lens out (data is the default for image models)")
        m = max_positions(a)
        for s in settings.seq_lens:
            if s != DATA and m is not None and s > m:
                raise BadInput(f"{a.path}: --seq-lens {s} is longer than the model's {m} positions",
                               hint=f"use --seq-lens {m} or less")
    vocabs = [v for a in arts if (v := vocab_size(a))]
    return min(vocabs) if vocabs else 1000


def _busy(load_before: float | None) -> str | None:
    cores = os.cpu_count() or 1
    if load_before is not None and load_before > 0.5 * cores:
        return (f"the machine is busy (load average {load_before:.1f} on {cores} CPUs before measuring): "
                "expect noisy numbers, ratios between runtimes too (torch and ONNX Runtime slow down "
                "differently when they share the cores)")
    return None


def _shape_rows(entries: list[Entry], measured: dict, where: tuple, tokens: tuple, settings: Settings,
                warnings: list[str]) -> list[dict]:
    """One result row per artifact at one shape, with its speed-ups against the
    first artifact and against its parent (a parent no slower is warned about)."""
    b, s, shape = where
    real, width = tokens
    rows = []
    for e in entries:
        m = measured[e.index]
        rows.append({
            "artifact": e.name, "batch_size": b, "seq_len": s,
            "tokens_per_sample": real, "padded_len": width,
            "calls": len(m["latencies"]), "rounds": settings.rounds,
            "latency_ms": percentiles(m["latencies"]),
            "throughput": spread(m["throughputs"]),
            **versus(e, entries, measured, shape, warnings),
        })
    return rows


def _meant_to_be_faster(child: Entry, parent: Entry) -> bool:
    """Every step promises speed but `mk tune` keeping its parent's format and size
    (a fine-tuned or LoRA-merged model), which is compared without a warning."""
    command = ((child.art.manifest.get("created_by") or {}).get("command") or "").split()
    if command[1:2] != ["tune"] or child.art.format != parent.art.format:
        return True
    sizes = [e.art.weights_file() for e in (child, parent)]
    return None in sizes or sizes[0].stat().st_size < sizes[1].stat().st_size


def versus(e: Entry, entries: list[Entry], measured: dict, shape: str, warnings: list[str]) -> dict:
    """`speedup` (per-round throughput ratios against the first artifact) and
    `vs_parent` (against its parent in the run; a parent no slower is warned about)."""
    m = measured[e.index]["throughputs"]
    out = {"speedup": {"vs": entries[0].name, **ratio(m, measured[entries[0].index]["throughputs"])},
           "vs_parent": None}
    if e.parent is not None:
        p = entries[e.parent]
        r = ratio(m, measured[p.index]["throughputs"])
        faster = r["median"] is not None and r["median"] >= NOISE
        promised = _meant_to_be_faster(e, p)
        out["vs_parent"] = {"parent": p.name, **r, "faster": faster, "promised": promised}
        if not faster and promised:
            warnings.append(f"{e.name} is no faster than its parent {p.name} at {shape} "
                            f"({r['median']:.2f}× throughput, needs ≥ {NOISE:.2f}× to count)")
    return out


def _artifact_row(e: Entry, entries: list[Entry], accuracy: dict, threads: int) -> dict:
    from mk.core.info import count_parameters

    desc = e.runtime.describe() if hasattr(e.runtime, "describe") else {}
    try:
        params = count_parameters(e.art)
    except MkError:
        params = None
    return {
        "name": e.name, "path": str(e.art.path), "format": e.art.format,
        "runtime": desc.get("runtime", getattr(e.runtime, "name", None)),
        "device": str(desc.get("device", getattr(e.runtime, "device", None))),
        "threads": desc.get("threads", threads),
        "parent": entries[e.parent].name if e.parent is not None else None,
        "size_bytes": size_on_disk(e.art.path), "parameters": params,
        "load_s": e.load_s, "load_rss_bytes": e.load_rss, "run_rss_bytes": e.run_rss,
        "peak_rss_bytes": e.peak_rss, "gpu_peak_bytes": e.gpu_peak,
        **accuracy,
    }


def _accuracy(e: Entry, dataset, split, settings: Settings, warnings: list[str]) -> dict:
    from mk.core.dataset import label_mismatch
    from mk.core.evaluation import evaluate

    none = {"accuracy": None, "macro_f1": None, "eval_rows": None,
            "dataset": str(dataset.path) if dataset is not None else None}
    if dataset is None or split is None or settings.eval_limit == 0:
        return none
    labels = list(e.art.labels)
    if not labels:
        warnings.append(f"{e.name}: accuracy not measured: the model has no labels (not a classifier)")
        return none
    if why := label_mismatch(labels, dataset.labels, "the model"):
        warnings.append(f"{e.name}: accuracy not measured: {why}")
        return none
    try:
        m = evaluate(e.runtime, split, num_labels=len(labels), batch_size=32,
                     description=f"accuracy of {e.name}")
    except Exception as err:  # noqa: BLE001
        raise _named(e.art, err, "fails on the test split") from None
    return {"accuracy": _r(m["accuracy"]), "macro_f1": _r(m["macro_f1"]), "eval_rows": m["n"],
            "dataset": str(dataset.path)}


# ------------------------------------------------------------ environment ---

def _loadavg() -> float | None:
    """The 1-minute load average: other work on the machine skews every number."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _versions() -> dict:
    from importlib import metadata

    out = {"mk": __version__}
    for dist in ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt", "numpy",
                 "safetensors", "polars", "psutil"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def environment(threads: int, requested: int | None) -> dict:
    """What the numbers were measured on: they mean little without it."""
    import platform

    import psutil

    env = {
        "cpu": this_cpu().model,
        "cpu_flags": list(this_cpu().flags),
        "int8_path": this_cpu().int8_path,
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": _versions(),
        "threads": {"used": threads, "requested": requested,
                    **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}},
        "gpu": None,
    }
    if "torch" in sys.modules:
        import torch

        env["threads"]["torch_intra_op"] = torch.get_num_threads()
        env["threads"]["torch_inter_op"] = torch.get_num_interop_threads()
        if torch.cuda.is_available():
            env["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                          "cuda": torch.version.cuda,
                          "memory_bytes": torch.cuda.get_device_properties(0).total_memory}
    if "onnxruntime" in sys.modules:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return env
