"""Distillation's loss: the divergence between the student's and the teacher's next-token
distributions on every answer token, beside the usual cross-entropy (`alpha`).

Per answer position, with s = log_softmax(student logits / T) and t = log_softmax(teacher
logits / T):

- forward KL: Σ e^t (t − s)   (KL(teacher ‖ student), the usual distillation loss);
- reverse KL: Σ e^s (s − t)   (KL(student ‖ teacher), mode-seeking);
- jsd: β·KL(t ‖ m) + (1 − β)·KL(s ‖ m), m = log(β e^t + (1 − β) e^s) (GKD's generalised JSD,
  written as TRL's `generalized_jsd_loss` computes it).

`chunk_terms` is the loss of a chunk of answer positions; the loss module, the teacher and the
precomputed top-k are the loop's side (`tunesmith.train.distill`). With precomputed top-k
teacher log-probabilities the divergence runs over those k tokens, both distributions
renormalised on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def divergence(student: torch.Tensor, teacher: torch.Tensor, loss: str, beta: float = 0.5):
    """The per-position divergence of log-distributions `student` and `teacher` (N, V)."""
    if loss == "forward_kl":
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    if loss == "reverse_kl":
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)
    if loss != "jsd":
        raise ValueError(f"unknown distillation loss {loss!r}")
    weights = torch.tensor([beta, 1 - beta], dtype=student.dtype, device=student.device).log()
    mixture = torch.logsumexp(torch.stack([teacher + weights[0], student + weights[1]]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def chunk_terms(head, hidden, teacher, targets, config, vocab: int, topk_ids=None):
    """[divergence sum, cross-entropy sum, argmax agreements] of one chunk of positions:
    `teacher` is the teacher's logits (N, V), or its top-k log-probabilities with `topk_ids`."""
    logits = (head(hidden) if head is not None else hidden).float()[:, :vocab]
    ce = F.cross_entropy(logits, targets, reduction="sum")
    student = F.log_softmax(logits / config.temperature, dim=-1)
    if topk_ids is None:
        teach = F.log_softmax(teacher.float()[:, :vocab] / config.temperature, dim=-1)
        agree = (logits.argmax(-1) == teacher[:, :vocab].argmax(-1)).sum()
    else:
        student = student.gather(-1, topk_ids)
        student = student - student.logsumexp(-1, keepdim=True)
        teach = F.log_softmax(teacher.float() / config.temperature, dim=-1)
        agree = (logits.argmax(-1) == topk_ids[:, 0]).sum()
    div = divergence(student, teach, config.loss, config.beta).sum()
    return torch.stack([div, ce, agree.to(div.dtype).detach()])
