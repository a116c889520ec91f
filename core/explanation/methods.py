"""The attribution methods: one score per word of one text, for one target class.

- `ig`: Captum's LayerIntegratedGradients over the input embeddings (torch models),
  from a baseline where every word piece is [PAD] ([CLS]/[SEP] kept); scores in
  logit units, summing to logit(text) − logit(baseline) (the completeness check).
- `occlusion`, `shap`, `lime`: Captum's FeatureAblation, KernelShap and Lime over a
  presence vector of the word pieces, grouped into words by a feature mask; a word
  is removed by masking its pieces out of attention. The model is only called, in
  batches, through the runtime interface, so ONNX and TensorRT artifacts are
  explained as they are served; scores in units of the target's probability.
- `attention`: attention rollout (Abnar & Zuidema, 2020) over the torch model's
  attention weights; class-agnostic, scores ≥ 0.
"""

from __future__ import annotations

import numpy as np

from mk.core.errors import BadInput
from mk.core.explanation.words import Encoded, sum_per_word

METHODS = ("ig", "occlusion", "shap", "lime", "attention")
NEEDS_TORCH = ("ig", "attention")  # read gradients or attention weights inside the model
# Completeness of ig: |sum of attributions − logit difference| within this share of it
# (or of 0.01 logit when the difference is tiny).
COMPLETENESS_TOLERANCE = 0.05
# LIME's text kernel: exp(−d²/2w²) of the cosine distance to the full text, w = 0.25
# (the reference implementation's 25 on distances scaled by 100).
LIME_KERNEL_WIDTH = 0.25


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Scorer:
    """Class probabilities of any runtime for batches of token ids, batch_size rows a call."""

    def __init__(self, runtime, batch_size: int = 32):
        self.runtime = runtime
        self.batch_size = batch_size
        self.calls = 0

    def probabilities(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(input_ids), self.batch_size):
            self.calls += 1
            out.append(self.runtime({"input_ids": input_ids[i:i + self.batch_size],
                                     "attention_mask": attention_mask[i:i + self.batch_size]}))
        return softmax(np.concatenate(out).astype(np.float64))

    def without_words(self, enc: Encoded, keep: np.ndarray, pad_id: int) -> np.ndarray:
        """Probabilities with the words' pieces removed where keep (rows × word pieces) is 0."""
        keep = np.asarray(keep) > 0.5
        positions = enc.word_positions
        ids = np.repeat(enc.input_ids[None], len(keep), axis=0)
        mask = np.repeat(enc.attention_mask[None], len(keep), axis=0)
        mask[:, positions] = keep
        ids[:, positions] = np.where(keep, ids[:, positions], pad_id)
        return self.probabilities(ids, mask)


def perturbation(method: str, scorer: Scorer, enc: Encoded, target: int, pad_id: int,
                 samples: int, seed: int) -> np.ndarray:
    """occlusion / shap / lime: one score per word, from batched calls of the runtime."""
    import torch
    from captum.attr import FeatureAblation, KernelShap, Lime
    from captum.attr._core.lime import get_exp_kernel_similarity_function
    from captum._utils.models.linear_model import SkLearnRidge

    def forward(presence: torch.Tensor) -> torch.Tensor:
        probs = scorer.without_words(enc, presence.detach().cpu().numpy(), pad_id)
        return torch.from_numpy(probs[:, target]).float()

    n_pieces = len(enc.word_positions)
    present = torch.ones(1, n_pieces)
    mask = torch.from_numpy(enc.feature_mask())[None]
    common = dict(baselines=0.0, feature_mask=mask, perturbations_per_eval=scorer.batch_size)
    torch.manual_seed(seed)
    if method == "occlusion":
        # Captum's Occlusion slides a window over tensor positions, which would cut words
        # into pieces; FeatureAblation removes one feature-mask group (a word) at a time.
        attr = FeatureAblation(forward).attribute(present, **common)
    elif method == "shap":
        attr = KernelShap(forward).attribute(present, n_samples=samples, **common)
    elif method == "lime":
        lime = Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0),
                    similarity_func=get_exp_kernel_similarity_function("cosine", LIME_KERNEL_WIDTH))
        attr = lime.attribute(present, n_samples=samples, **common)
    else:
        raise BadInput(f"unknown perturbation method {method!r}")
    per_piece = attr[0].detach().numpy()
    # every piece of a word carries the word's score: read it at the word's first piece
    piece_index = {int(p): j for j, p in enumerate(enc.word_positions)}
    return np.array([float(per_piece[piece_index[w["tokens"][0]]]) for w in enc.words])


def _torch_inputs(model, enc: Encoded):
    import torch

    device = next(model.parameters()).device
    ids = torch.from_numpy(enc.input_ids)[None].to(device)
    mask = torch.from_numpy(enc.attention_mask)[None].to(device)
    return ids, mask


def integrated_gradients(model, enc: Encoded, target: int, pad_id: int, steps: int,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Word scores, token scores and the completeness check of integrated gradients."""
    import torch
    from captum.attr import LayerIntegratedGradients

    ids, mask = _torch_inputs(model, enc)
    baseline = ids.clone()
    baseline[0, torch.from_numpy(enc.word_positions).to(ids.device)] = pad_id

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    attr, delta = lig.attribute(ids, baselines=baseline, target=target, additional_forward_args=(mask,),
                                n_steps=steps, internal_batch_size=batch_size, return_convergence_delta=True)
    token_scores = attr.sum(dim=-1)[0].detach().float().cpu().numpy()
    with torch.no_grad():
        difference = float(forward(ids, mask)[0, target] - forward(baseline, mask)[0, target])
    error = abs(float(delta[0]))
    completeness = {"sum": float(token_scores.sum()), "logit_difference": difference, "error": error,
                    "tolerance": COMPLETENESS_TOLERANCE * max(abs(difference), 0.2),
                    "steps": steps}
    completeness["ok"] = error <= completeness["tolerance"]
    return sum_per_word(token_scores, enc), token_scores, completeness


def attention_rollout(model, enc: Encoded) -> tuple[np.ndarray, np.ndarray]:
    """Attention rollout from the first token ([CLS]). Written here because Captum has
    none: it is a product of the layers' head-averaged attention matrices, with the
    residual connection added as identity, a few lines over `output_attentions`."""
    import torch

    ids, mask = _torch_inputs(model, enc)
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    if not attentions or attentions[0] is None:
        raise BadInput("--method attention: the model returns no attention weights",
                       hint="use --method ig or occlusion")
    eye = torch.eye(ids.shape[1], device=ids.device)
    rollout = eye
    for layer in attentions:
        a = 0.5 * layer[0].float().mean(dim=0) + 0.5 * eye
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
    token_scores = rollout[0].cpu().numpy()
    return sum_per_word(token_scores, enc), token_scores
