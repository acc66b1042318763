"""Which examples each process trains on at each optimizer step.

The order is a pure function of (seed, epoch, step), so a resumed run finds its data position
from the step counter alone, and a run with W processes and A accumulation steps sees, step by
step, exactly the examples a single process with W * A accumulation steps would. Given the
examples' lengths, each step's examples are sorted by length before they are cut into micro-batches:
the step's gradient is the same, and micro-batches of similar lengths waste less on padding.
"""

from __future__ import annotations

import math

import torch


class DataOrder:
    def __init__(self, n_examples: int, batch_size: int, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int,
                 lengths: list[int] | None = None):
        if n_examples < batch_size:
            raise ValueError(f"{n_examples} examples are fewer than one batch of {batch_size}")
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"{len(lengths)} lengths for {n_examples} examples")
        self.n_examples, self.batch_size, self.lengths = n_examples, batch_size, lengths
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = n_examples // batch_size  # the last partial batch of an epoch is dropped

    def total_steps(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def global_batch(self, step: int) -> list[int]:
        """Every example index of optimizer step ``step``, over all processes."""
        epoch, k = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.n_examples, generator=generator)
        return permutation[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches for ``step``: micro-batch a of rank r is slice a * W + r
        (of the step's examples longest first, when their lengths are known)."""
        batch = self.global_batch(step)
        if self.lengths is not None:
            batch = sorted(batch, key=lambda i: -self.lengths[i])  # stable: equal lengths keep their random order
        size = self.micro_batch_size
        return [batch[(a * self.world_size + self.rank) * size : (a * self.world_size + self.rank + 1) * size] for a in range(self.grad_accum)]
