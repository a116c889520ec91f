"""`mk prune`: remove whole layers and feed-forward neurons from a fine-tuned
encoder, and write a smaller dense model that loads with stock transformers.

What is removed is chosen by importance measured on calibration rows of the
train split of the dataset in the lineage (or --data), see `structured`:

- `--layers N` keeps N layers, dropping one at a time the layer whose skipping
  raises the calibration loss least (re-measured after every drop);
- `--ffn F` removes the fraction F of every layer's FFN neurons, the lowest
  Taylor scores of each layer;
- `--target-flops F` (fraction of FLOPs kept) or `--target-params N` choose
  among both greedily: each step takes whichever of "drop the next layer" and
  "remove another eighth of the FFN neurons" raises the calibration loss least
  per FLOP (or parameter) saved, until the target is met;
- with none of these, half the layers and half of every FFN (DEFAULT_FFN).

The parent and the result are evaluated on the test split through the runtime
interface `mk bench` uses (the result reloaded from disk with stock
from_pretrained); parameters, size on disk and FLOPs per sequence before and
after go into mk.json and on stderr. `pruning.json` beside the weights keeps
every score and every removed index. Accuracy is recovered by distillation from
the parent: `mk tune DATA --model PRUNED --teacher PARENT`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from mk.core.artifact import Artifact, human_bytes, open_artifact, write_manifest
from mk.core.compression import structured as st
from mk.core.console import log
from mk.core.errors import BadInput
from mk.core.outputs import atomic_output, check_output
from mk.core.runtime.adapters import check_whole_model

IMPORTANCE = ("taylor", "magnitude")
FFN_STEP = 1 / 8  # the granularity of the FFN in a target search
# With no target: keep half the layers and half of every FFN. DistilBERT's depth (Sanh et al.
# 2019), with the neurons and layers chosen by importance; distilled for mk tune's default 3
# epochs it kept accuracy within 1.25 points on two datasets, at 4.8-4.9x the speed in int8
# (README, `mk prune`). The FLOPs target it replaced (0.5) kept 4 or 5 of 6 layers, 3.5-3.9x on that host:
# FLOPs leave out the norms, softmax, mask and reshapes that every layer carries whatever its FFN
# width, 38-39% of the time of the pruned int8 MiniLM at 32 x 128 (scripts/profile_onnx.py).
DEFAULT_FFN = 0.5


@dataclass
class PruneTargets:
    layers: int | None = None            # layers kept
    ffn: float | None = None             # fraction of FFN neurons removed in every layer
    heads: float | None = None           # fraction of heads removed: refused (see structured)
    target_flops: float | None = None    # fraction of FLOPs per sequence kept
    target_params: int | None = None     # parameters kept

    def check(self) -> None:
        """The checks that need no model; every problem at once."""
        problems = []
        if self.heads:
            problems.append(f"--heads {self.heads:g}: {st.HEADS_NOT_EXPRESSIBLE}")
        if self.ffn is not None and not 0 <= self.ffn < 1:
            problems.append(f"--ffn {self.ffn:g}: a fraction of neurons to remove, in [0, 1)")
        if self.heads is not None and not 0 <= self.heads < 1:
            problems.append(f"--heads {self.heads:g}: a fraction of heads to remove, in [0, 1)")
        if self.layers is not None and self.layers < 1:
            problems.append(f"--layers {self.layers}: the model needs at least one layer")
        if self.target_flops is not None and not 0 < self.target_flops < 1:
            problems.append(f"--target-flops {self.target_flops:g}: the fraction of FLOPs kept, in (0, 1)")
        if self.target_params is not None and self.target_params < 1:
            problems.append(f"--target-params {self.target_params}: a number of parameters kept")
        if self.target_flops is not None and self.target_params is not None:
            problems.append("--target-flops and --target-params: give one target")
        if self.searched and (self.layers is not None or self.ffn is not None):
            problems.append("--target-flops/--target-params choose the layers and neurons themselves; "
                            "give either a target or --layers/--ffn")
        if problems:
            raise BadInput("; ".join(problems))

    @property
    def searched(self) -> bool:
        return self.target_flops is not None or self.target_params is not None


def _check_model(art: Artifact) -> dict:
    check_whole_model(art.path, "mk prune")
    if art.format != "safetensors":
        raise BadInput(f"{art.path}: a {art.format} model cannot be pruned; give the safetensors model it came from",
                       hint="see `mk info --lineage` for its parent")
    config = art.config()
    archs = config.get("architectures") or []
    if art.task != "text-classification" or not any(a.endswith("ForSequenceClassification") for a in archs):
        raise BadInput(f"{art.path}: not a text classifier ({', '.join(archs) or 'no architecture'}); "
                       "mk prune measures and keeps what matters to a classification head",
                       hint="fine-tune it first: mk tune DATA --model MODEL")
    if config.get("model_type") not in st.SUPPORTED:
        raise BadInput(f"{art.path}: cannot prune a {config.get('model_type')!r} model; "
                       f"mk prune handles {', '.join(st.SUPPORTED)}")
    return config


def _dataset(art: Artifact, data, importance: str):
    """The dataset for calibration and evaluation; without one only magnitude works."""
    from mk.core.dataset import check_labels, dataset_for
    from mk.core.tokenizer_match import check_same_tokenizer

    try:
        ds = dataset_for(art, data)
    except BadInput as e:
        if importance == "magnitude" and data is None:
            log.warning("%s; pruning by magnitude without evaluating", e.message)
            return None
        raise BadInput(f"{e.message}; Taylor importance is measured on it",
                       hint="pass --data DATASET, or --importance magnitude (data-free)") from None
    check_same_tokenizer(ds, art.path)
    check_labels(art, ds, hint="pass --data with a dataset prepared with the model's labels")
    return ds


class Sizes:
    """Parameters and FLOPs of the model for any (layers kept, FFN fraction removed)."""

    def __init__(self, model):
        import copy

        self.config = copy.deepcopy(model.config)
        self.layers = model.config.num_hidden_layers
        self.ffn = model.config.intermediate_size
        self.params = st.count_params(model)
        self.layer_params = st.count_params(st.encoder_layers(model)[0])
        self.neuron_params = 2 * model.config.hidden_size + 1  # a row and bias in, a column out
        self.flops = self.flops_of(self.layers, 0.0)

    def neurons(self, fraction: float) -> int:
        return self.ffn - int(round(fraction * self.ffn))

    def params_of(self, layers: int, fraction: float) -> int:
        return (self.params - (self.layers - layers) * self.layer_params
                - layers * (self.ffn - self.neurons(fraction)) * self.neuron_params)

    def flops_of(self, layers: int, fraction: float) -> int:
        self.config.num_hidden_layers, self.config.intermediate_size = layers, self.neurons(fraction)
        return st.flops_per_sequence(self.config)


def _check_reachable(targets: PruneTargets, sizes: Sizes, path: Path) -> None:
    problems = []
    if targets.layers is not None and targets.layers > sizes.layers:
        problems.append(f"--layers {targets.layers}: the model has {sizes.layers}")
    if targets.ffn is not None and sizes.neurons(targets.ffn) < 1:
        problems.append(f"--ffn {targets.ffn:g}: would leave no FFN neuron of {sizes.ffn}")
    smallest = 1 - FFN_STEP
    if targets.target_params is not None and sizes.params_of(1, smallest) > targets.target_params:
        problems.append(f"--target-params {targets.target_params}: the smallest model layers and FFN neurons "
                        f"give has {sizes.params_of(1, smallest):,} parameters (the embeddings and the head "
                        "are not pruned)")
    if targets.target_flops is not None and sizes.flops_of(1, smallest) > targets.target_flops * sizes.flops:
        problems.append(f"--target-flops {targets.target_flops:g}: the smallest model keeps "
                        f"{sizes.flops_of(1, smallest) / sizes.flops:.3f} of the FLOPs")
    if problems:
        raise BadInput(f"{path}: " + "; ".join(problems))


def _calibration(ds, model, rows: int, batch_size: int, seed: int):
    import torch
    from mk.core.dataset import SPLITS, batches, load_split
    from mk.core.runtime.torch_runtime import accepts_token_types

    split_name = next(s for s in SPLITS if (ds.path / f"{s}.safetensors").is_file())
    split = load_split(ds, split_name)
    order = np.random.default_rng(seed).permutation(len(split["labels"]))[:rows]
    split = {k: v[np.sort(order)] for k, v in split.items()}
    with_tt = accepts_token_types(model)
    calib = [(st.feed(x, model.device, with_tt), torch.from_numpy(y).long().to(model.device))
             for x, y in batches(split, batch_size)]
    return calib, {"split": split_name, "rows": int(len(order)), "seed": seed}


# --------------------------------------------------------------------------- choosing what to remove


@dataclass
class Plan:
    drop: list[int]          # layers removed (indices in the parent)
    fraction: float          # FFN fraction removed in every kept layer
    layer_scores: dict       # first measurement: loss with the layer skipped, or its weights' norm
    steps: list[dict]        # each removal, in order, with its score


class Planner:
    """Greedy choice of layers and FFN fraction, by measured loss (taylor) or norms."""

    def __init__(self, model, sizes: Sizes, neuron_scores, calib, importance: str):
        self.model, self.sizes, self.neuron_scores = model, sizes, neuron_scores
        self.calib, self.taylor = calib, importance == "taylor"
        self.static_layer_scores = None if self.taylor else st.magnitude_layer_scores(model)

    def masks(self, fraction: float):
        if not fraction:
            return [None] * self.sizes.layers
        return st.keep_masks(self.neuron_scores, fraction, self.model.device)

    def loss(self, drop: list[int], fraction: float) -> float:
        with st.ffn_masks(self.model, self.masks(fraction)), st.skipping(self.model, drop):
            return st.calibration_loss(self.model, self.calib)

    def layer_scores(self, drop: list[int], fraction: float) -> dict[int, float]:
        if self.taylor:
            return st.layer_skip_losses(self.model, self.calib, drop, self.masks(fraction))
        return {i: s for i, s in self.static_layer_scores.items() if i not in drop}

    def explicit(self, keep_layers: int, fraction: float) -> Plan:
        plan = Plan([], fraction, {}, [])
        while self.sizes.layers - len(plan.drop) > keep_layers:
            self._drop_layer(plan)
        if fraction:
            plan.steps.append({"remove": "ffn", "fraction": fraction})
        return plan

    def _drop_layer(self, plan: Plan, scores: dict | None = None) -> None:
        scores = scores or self.layer_scores(plan.drop, plan.fraction)
        plan.layer_scores = plan.layer_scores or {i: round(s, 6) for i, s in scores.items()}
        i = min(scores, key=scores.get)
        plan.drop.append(i)
        plan.steps.append({"remove": "layer", "layer": i, "score": round(scores[i], 6)})
        log.info("removing layer %d (%s %.4f)", i, "calibration loss without it" if self.taylor else "weight norm",
                 scores[i])

    def search(self, cost, target: float) -> Plan:
        """Remove, step by step, what costs the least calibration loss per unit of
        `cost` saved (under magnitude: FFN down to half first, then layers)."""
        plan = Plan([], 0.0, {}, [])
        current = self.loss([], 0.0) if self.taylor else 0.0
        while cost(self.sizes.layers - len(plan.drop), plan.fraction) > target:
            n, here = self.sizes.layers - len(plan.drop), cost(self.sizes.layers - len(plan.drop), plan.fraction)
            wider = plan.fraction + FFN_STEP if self.sizes.neurons(plan.fraction + FFN_STEP) >= 1 else None
            scores = self.layer_scores(plan.drop, plan.fraction) if n > 1 else None
            if self.taylor:
                options = []
                if scores:
                    options.append(("layer", min(scores.values()), cost(n - 1, plan.fraction)))
                if wider is not None:
                    options.append(("ffn", self.loss(plan.drop, wider), cost(n, wider)))
                kind, loss, _ = min(options, key=lambda o: (max(o[1] - current, 0) / max(here - o[2], 1e-12),
                                                            o[2]))
                current = loss
            else:
                kind = "ffn" if wider is not None and (wider <= 0.5 or not scores) else "layer"
            if kind == "layer":
                self._drop_layer(plan, scores)
            else:
                plan.fraction = wider
                plan.steps.append({"remove": "ffn", "fraction": wider,
                                   **({"loss": round(current, 6)} if self.taylor else {})})
                log.info("removing %.0f%% of the FFN neurons%s", 100 * wider,
                         f" (calibration loss {current:.4f})" if self.taylor else "")
        return plan


def _plan(planner: Planner, targets: PruneTargets, sizes: Sizes) -> Plan:
    if targets.target_flops is not None:
        return planner.search(lambda n, f: sizes.flops_of(n, f) / sizes.flops, targets.target_flops)
    if targets.target_params is not None:
        return planner.search(sizes.params_of, targets.target_params)
    return planner.explicit(targets.layers or sizes.layers, targets.ffn or 0.0)


# --------------------------------------------------------------------------- the command


def prune(model: str | Path, out: str | Path, targets: PruneTargets | None = None, data: str | Path | None = None,
          importance: str = "taylor", calib_size: int = 256, batch_size: int = 32, device: str = "auto",
          seed: int = 0, force: bool = False) -> dict:
    """Prune `model` into the artifact `out`; return the result (path, metrics, pruning).
    Bad input raises BadInput before anything is written."""
    import torch
    import transformers
    from mk.core.dataset import load_split
    from mk.core.device import resolve_device
    from mk.core.runtime.torch_runtime import TorchRuntime, load_classifier

    transformers.utils.logging.disable_progress_bar()  # mk reports its own steps
    targets = targets or PruneTargets()
    if importance not in IMPORTANCE:
        raise BadInput(f"--importance {importance!r}: expected one of {', '.join(IMPORTANCE)}")
    if calib_size < 1:
        raise BadInput(f"--calib-size {calib_size}: needs at least one row")
    targets.check()
    default = not targets.searched and targets.layers is None and targets.ffn is None
    art = open_artifact(model, kind="model")
    _check_model(art)
    out = check_output(Path(out), force, inputs=[art.path, data])
    ds = _dataset(art, data, importance)
    device = resolve_device(device)
    torch.manual_seed(seed)
    net = load_classifier(art.path, art.task).to(device).eval()
    sizes = Sizes(net)
    if default:
        targets.layers, targets.ffn = max(1, sizes.layers // 2), DEFAULT_FFN
    _check_reachable(targets, sizes, art.path)

    test = load_split(ds, "test") if ds is not None and (ds.path / "test.safetensors").is_file() else None
    n_labels = len(art.labels) or net.config.num_labels
    before = _evaluate(TorchRuntime(net, device), test, n_labels, batch_size, "evaluating the parent")
    calib, calib_info = (_calibration(ds, net, calib_size, batch_size, seed) if importance == "taylor"
                         else (None, None))
    neuron_scores = (st.taylor_neuron_scores(net, calib) if calib is not None else st.magnitude_neuron_scores(net))
    plan = _plan(Planner(net, sizes, neuron_scores, calib, importance), targets, sizes)
    keep_layers = [i for i in range(sizes.layers) if i not in plan.drop]
    keep_neurons = ([st.kept_neurons(neuron_scores[i], plan.fraction) for i in keep_layers]
                    if plan.fraction else None)
    st.remove(net, keep_layers, keep_neurons)
    record = {"importance": importance, "targets": {**{k: v for k, v in asdict(targets).items() if v is not None},
                                                        **({"default": True} if default else {})},
              "calibration": calib_info, "removed": {"layers": sorted(plan.drop), "ffn_fraction": plan.fraction,
              "ffn_neurons_per_layer": sizes.ffn - sizes.neurons(plan.fraction)},
              "kept": {"layers": keep_layers, "intermediate_size": sizes.neurons(plan.fraction)},
              "layer_scores": plan.layer_scores, "steps": plan.steps, "scores_file": "pruning.json"}
    detail = {"layer_scores": plan.layer_scores,
              "neuron_scores": {i: [float(f"{x:.4g}") for x in s] for i, s in enumerate(neuron_scores)},
              "removed_neurons": {i: sorted(set(range(sizes.ffn)) - set(k))
                                  for i, k in zip(keep_layers, keep_neurons or [])}}
    with atomic_output(out, force) as tmp:
        metrics = _write(tmp, art, ds, net, record, detail, sizes, before, test, n_labels, batch_size, device)
    result = {"path": str(out), "metrics": metrics, "pruning": record}
    _report(art, out, record, metrics, sizes)
    return result


def _evaluate(runtime, test, n_labels: int, batch_size: int, description: str) -> dict | None:
    from mk.core.evaluation import evaluate

    return evaluate(runtime, test, n_labels, batch_size, description) if test is not None else None


def _write(tmp: Path, art: Artifact, ds, net, record, detail, sizes: Sizes, before, test, n_labels, batch_size,
           device) -> dict:
    from mk.core.compression.onnx_io import copy_tokenizer_files
    from mk.core.runtime import load_runtime

    copy_tokenizer_files(art.path, tmp)  # its config.json is then replaced by the pruned one
    net.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "pruning.json").write_text(json.dumps(detail) + "\n")
    for name in ("preprocessor_config.json",):
        if (art.path / name).is_file():
            shutil.copy2(art.path / name, tmp / name)
    # evaluated as every later step will load it: from disk, with stock from_pretrained
    reloaded = Artifact(tmp, {"kind": "model", "format": "safetensors", "task": art.task, "labels": art.labels})
    after = _evaluate(load_runtime(reloaded, device), test, n_labels, batch_size, "evaluating the pruned model")
    metrics = {"params": st.count_params(net), "parent_params": sizes.params,
               "size_bytes": (tmp / "model.safetensors").stat().st_size,
               "parent_size_bytes": art.weights_file().stat().st_size,
               "flops_per_sequence": st.flops_per_sequence(net.config), "parent_flops_per_sequence": sizes.flops,
               "flops_seq_len": st.SEQ_LEN}
    if after is not None:
        metrics.update(accuracy=after["accuracy"], macro_f1=after["macro_f1"], parent_accuracy=before["accuracy"],
                       parent_macro_f1=before["macro_f1"], split="test", n=after["n"],
                       accuracy_drop_points=round((before["accuracy"] - after["accuracy"]) * 100, 4))
    write_manifest(tmp, kind="model", format="safetensors", task=art.task, labels=art.labels, parent=art,
                   dataset=ds, metrics=metrics, pruning=record)
    return metrics


def _report(art: Artifact, out: Path, record: dict, m: dict, sizes: Sizes) -> None:
    removed = record["removed"]
    log.info("pruned %s → %s: layers %d → %d (removed %s), FFN %d → %d neurons per layer", art.path, out,
             sizes.layers, len(record["kept"]["layers"]), removed["layers"] or "none", sizes.ffn,
             record["kept"]["intermediate_size"])
    log.info("parameters %s → %s (%.2f×), size %s → %s, FLOPs per %d-token sequence %.2fG → %.2fG (%.2f×)",
             f"{m['parent_params']:,}", f"{m['params']:,}", m["params"] / m["parent_params"],
             human_bytes(m["parent_size_bytes"]), human_bytes(m["size_bytes"]), m["flops_seq_len"],
             m["parent_flops_per_sequence"] / 1e9, m["flops_per_sequence"] / 1e9,
             m["flops_per_sequence"] / m["parent_flops_per_sequence"])
    if "accuracy" in m:
        log.info("test accuracy %.2f%% → %.2f%% (%d rows) before recovery; recover it by distillation: "
                 "mk tune DATA --model %s --teacher %s -o …", 100 * m["parent_accuracy"], 100 * m["accuracy"],
                 m["n"], out, art.path)
