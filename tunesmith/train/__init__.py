"""Training: the loss now; the loop, optimizers, schedules and checkpoints arrive with the
training capability."""

from tunesmith.train.loss import causal_lm_loss_sum

__all__ = ["causal_lm_loss_sum"]
