"""Training: the loop (`train`, `Run`), the chunked loss, optimizers, schedules and
checkpoints."""

from tunesmith.train.loop import Run, TrainingError, train
from tunesmith.train.loss import causal_lm_loss_sum, model_loss_sum

__all__ = ["Run", "TrainingError", "causal_lm_loss_sum", "model_loss_sum", "train"]
