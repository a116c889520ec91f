"""LoRA for `mk tune --lora R` (and causal LMs by default): peft adapters on the layers that matter for each
architecture, merged into plain weights on save unless `--no-merge`."""

from __future__ import annotations

import warnings

from mk.core.errors import BadInput, library_error


# Attention projections and feed-forward layers of the encoder (regexes are matched
# against whole module names, so heads and poolers are left to `modules_to_save`).
TARGETS = {
    "bert": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
    "roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
    "xlm-roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
    "camembert": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
    "electra": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
    "mpnet": r".*encoder\.layer\.\d+\..*(q|k|v|o|dense)",
    "deberta-v2": r".*encoder\.layer\.\d+\..*(query_proj|key_proj|value_proj|dense)",
    "deberta": r".*encoder\.layer\.\d+\..*(in_proj|dense)",
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "albert": ["query", "key", "value", "dense", "ffn", "ffn_output"],
    "vit": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
    "deit": r".*encoder\.layer\.\d+\..*(query|key|value|dense)",
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# Classification heads (and BERT's pooler, which feeds the head) train in full.
HEADS = ["classifier", "score", "pooler"]


def target_modules(model_type: str):
    """The modules LoRA adapts for an architecture; peft's `all-linear` otherwise."""
    return TARGETS.get(model_type, "all-linear")


def wrap(model, r: int, alpha: int | None = None, dropout: float = 0.1):
    """The model with LoRA adapters of rank `r`; only adapters and the head train."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise BadInput(f"--lora {r}: the rank must be at least 1")
    heads = [h for h in HEADS if any(n == h or n.endswith("." + h) for n, _ in model.named_modules())]
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout,
                        target_modules=target_modules(model.config.model_type),
                        modules_to_save=heads, fan_in_fan_out=model.config.model_type == "gpt2",
                        bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated for v6: not the user's
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise library_error(e, "--lora", f"cannot place adapters in a {model.config.model_type} model") \
            from None


def unwrap_for_save(model, merge: bool = True):
    """Merged: a plain transformers model; not merged: the peft model as is."""
    return model.merge_and_unload() if merge else model
