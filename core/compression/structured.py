"""Structures of a BERT-style encoder that `mk prune` can remove, what they cost
and how much they matter.

Two structures, both expressible in the stock configuration (so the pruned model
loads with `AutoModelForSequenceClassification.from_pretrained`):

- whole layers (`num_hidden_layers`);
- feed-forward neurons, the same count in every layer (`intermediate_size`).

Attention heads are not among them: BERT-style configurations derive the head
size as `hidden_size / num_attention_heads`, and query/key/value project to
`hidden_size` features, so a model with fewer heads of the same size (fewer
than `hidden_size` attention features) cannot be written as a stock config;
transformers 5 also dropped `pruned_heads`. `HEADS_NOT_EXPRESSIBLE` says so.

Importance is measured, by default, on calibration batches (Michel et al. 2019):
a neuron's score is the mean over examples of |dL/dm|, the first-order (Taylor)
estimate of the loss change when a mask m on its activation goes from 1 to 0;
a layer's is the calibration loss increase when it is skipped. `magnitude`
scores need no data: L2 norms of the weights that move together.

The surgery on the feed-forward block is torch-pruning's: its dependency graph
finds that the rows of `intermediate.dense` and the columns of `output.dense`
go together. Layers are removed from the encoder's ModuleList by hand, because
torch-pruning removes channels, not depth.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

# model_type values whose layers are `encoder.layer[i].{attention, intermediate, output}`
SUPPORTED = ("bert", "roberta", "xlm-roberta")
HEADS_NOT_EXPRESSIBLE = (
    "attention heads cannot be removed in a model that loads with a stock configuration: BERT-style configs "
    "derive the head size as hidden_size / num_attention_heads, so fewer heads would mean larger heads, "
    "not fewer")
SEQ_LEN = 128  # FLOPs are reported for one sequence of this many tokens


def encoder_layers(model):
    return model.base_model.encoder.layer


def flops_per_sequence(config, seq_len: int = SEQ_LEN) -> int:
    """Multiply-adds × 2 of the encoder and the head for one sequence (embedding
    look-ups, norms and activations left out: they are a few percent)."""
    h, f, n, s = config.hidden_size, config.intermediate_size, config.num_hidden_layers, seq_len
    per_layer = 4 * s * h * h + 2 * s * s * h + 2 * s * h * f  # q, k, v, o; scores and context; FFN
    head = h * h + h * config.num_labels  # pooler (or dense) and classifier, on one token
    return 2 * (n * per_layer + head)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- calibration


def feed(inputs: dict, device, with_token_types: bool) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).long().to(device) for k, v in inputs.items()
            if with_token_types or k != "token_type_ids"}


def calibration_loss(model, calib) -> float:
    """Mean cross-entropy of the model over calibration batches [(feed, labels)]."""
    import torch
    import torch.nn.functional as F

    total, n = 0.0, 0
    with torch.inference_mode():
        for inputs, labels in calib:
            total += float(F.cross_entropy(model(**inputs).logits.float(), labels, reduction="sum"))
            n += len(labels)
    return total / max(n, 1)


@contextmanager
def skipping(model, drop: list[int]):
    """Run the model without the layers `drop` (the encoder iterates its ModuleList)."""
    import torch.nn as nn

    encoder = model.base_model.encoder
    full = encoder.layer
    encoder.layer = nn.ModuleList([m for i, m in enumerate(full) if i not in set(drop)])
    try:
        yield
    finally:
        encoder.layer = full


@contextmanager
def ffn_masks(model, masks):
    """Multiply each layer's FFN activation by its mask: with mask 0, a neuron is
    removed exactly (the activation feeds only `output.dense`). A mask of shape
    (batch, 1, F) that requires grad gives per-example Taylor scores."""
    handles = [layer.intermediate.register_forward_hook(lambda mod, args, out, i=i: out * masks[i])
               for i, layer in enumerate(encoder_layers(model)) if masks[i] is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def keep_masks(neuron_scores: list, fraction: float, device=None) -> list:
    """0/1 masks keeping, in every layer, the same number of its highest-scored neurons."""
    import torch

    masks = []
    for s in neuron_scores:
        keep = kept_neurons(s, fraction)
        m = torch.zeros(len(s), device=device)
        m[keep] = 1.0
        masks.append(m)
    return masks


def kept_neurons(scores, fraction: float) -> list[int]:
    """Indices (ascending) of the neurons a layer keeps when `fraction` is removed."""
    n = len(scores)
    k = n - int(round(fraction * n))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return sorted(int(i) for i in order[:k])


# --------------------------------------------------------------------------- scores


def taylor_neuron_scores(model, calib) -> list[np.ndarray]:
    """Per layer and neuron: mean over examples of |dL/dm| (Michel et al. 2019)."""
    import torch
    import torch.nn.functional as F

    layers = encoder_layers(model)
    sums = [torch.zeros(layer.intermediate.dense.out_features) for layer in layers]
    n = 0
    for inputs, labels in calib:
        masks = [torch.ones(len(labels), 1, layer.intermediate.dense.out_features, requires_grad=True,
                            device=labels.device) for layer in layers]
        with ffn_masks(model, masks):
            loss = F.cross_entropy(model(**inputs).logits.float(), labels, reduction="sum")
        grads = torch.autograd.grad(loss, masks)
        for s, g in zip(sums, grads):
            s += g.detach().abs().sum(dim=(0, 1)).cpu()
        n += len(labels)
    return [(s / max(n, 1)).numpy() for s in sums]


def magnitude_neuron_scores(model) -> list[np.ndarray]:
    """Per layer and neuron: the L2 norm of its coupled weights (row of the input
    projection with its bias, column of the output projection), via torch-pruning."""
    import torch_pruning as tp

    importance = tp.importance.GroupMagnitudeImportance(p=2)
    graph = _dependency_graph(model)
    scores = []
    for layer in encoder_layers(model):
        dense = layer.intermediate.dense
        group = graph.get_pruning_group(dense, tp.prune_linear_out_channels, idxs=list(range(dense.out_features)))
        scores.append(importance(group).detach().cpu().numpy())
    return scores


def layer_skip_losses(model, calib, drop: list[int], masks) -> dict[int, float]:
    """Calibration loss with each remaining layer skipped in turn (already dropped
    layers and FFN masks applied)."""
    out = {}
    with ffn_masks(model, masks):
        for i in range(len(encoder_layers(model))):
            if i not in drop:
                with skipping(model, [*drop, i]):
                    out[i] = calibration_loss(model, calib)
    return out


def magnitude_layer_scores(model) -> dict[int, float]:
    """Data-free stand-in for a layer's importance: the L2 norm of all its weights."""
    import torch

    return {i: float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in layer.parameters())))
            for i, layer in enumerate(encoder_layers(model))}


# --------------------------------------------------------------------------- surgery


def _dependency_graph(model):
    import torch
    import torch_pruning as tp

    example = {"input_ids": torch.ones(1, 8, dtype=torch.long, device=model.device),
               "attention_mask": torch.ones(1, 8, dtype=torch.long, device=model.device)}
    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def remove(model, keep_layers: list[int], keep_neurons: list[list[int]] | None) -> None:
    """Remove in place every FFN neuron not in `keep_neurons[i]` (torch-pruning) and
    every layer not in `keep_layers`; the config follows, so save_pretrained writes a
    stock model. `keep_neurons[j]` belongs to layer `keep_layers[j]`, the same count for each."""
    import torch.nn as nn
    import torch_pruning as tp

    layers = encoder_layers(model)
    if keep_neurons is not None:
        graph = _dependency_graph(model)
        for i, keep in zip(keep_layers, keep_neurons):
            dense = layers[i].intermediate.dense
            idxs = sorted(set(range(dense.out_features)) - set(keep))
            if idxs:
                graph.get_pruning_group(dense, tp.prune_linear_out_channels, idxs=idxs).prune()
        model.config.intermediate_size = len(keep_neurons[0])
    kept = nn.ModuleList([layers[i] for i in keep_layers])
    for new_idx, layer in enumerate(kept):  # a KV cache is indexed by position in the stack
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    model.base_model.encoder.layer = kept
    model.config.num_hidden_layers = len(kept)
