"""Task-vector methods (`task_vectors.py`): TIES, DARE and magnitude pruning on plain tensors."""

from __future__ import annotations

import torch

from tunesmith.task_vectors import combine_tasks


def test_task_vector_methods():
    tasks = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, -2.0, 0.25, 4.0])]
    # magnitude prune at density 0.5 keeps each task's two largest entries
    got = combine_tasks(tasks, [1.0, 1.0], "magnitude_prune", 0.5)
    torch.testing.assert_close(got, torch.tensor([3.0, -2.0, 0.0, 2.0]))
    # ties: sign of the sum elects (+, -, +, +); the disjoint mean of agreeing entries
    got = combine_tasks(tasks, [1.0, 1.0], "ties", 1.0)
    torch.testing.assert_close(got, torch.tensor([3.0, -1.5, 0.375, 4.0]))
    got = combine_tasks(tasks, [1.0, 1.0], "ties", 1.0, majority_sign="frequency")
    torch.testing.assert_close(got, torch.tensor([3.0, -1.5, 0.375, 4.0]))
    # DARE keeps the expectation
    big = [torch.ones(200_000)]
    mean = combine_tasks(big, [1.0], "dare_linear", 0.25, torch.Generator().manual_seed(0)).mean()
    assert abs(float(mean) - 1.0) < 0.02
