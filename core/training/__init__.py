"""Training: `mk tune` (full fine-tuning, LoRA, distillation) and its checkpoints."""
