"""Knowledge distillation for `mk tune --teacher MODEL`: the student learns the
teacher's softened output distribution as well as the labels. Only logits are
matched, so teacher and student may differ in depth, width and hidden size (a
pruned model recovering its accuracy from its unpruned parent, say)."""

from __future__ import annotations


def per_example_loss(student_logits, labels, teacher_logits=None, temperature: float = 2.0,
                     alpha: float = 0.5):
    """Loss of each example: cross-entropy with the labels, or with a teacher
    `alpha * T² · KL(teacher_T ‖ student_T) + (1 - alpha) * cross-entropy`
    (Hinton et al. 2015; the T² keeps gradient scales comparable across T)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    if teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1),
                  F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="none", log_target=True).sum(dim=-1) * (t * t)
    return alpha * kl + (1.0 - alpha) * ce
