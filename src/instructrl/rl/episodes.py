"""Which prompts an iteration's episodes answer, which process holds each, its sampling seed,
and the minibatches of later PPO epochs.

Everything here is a function of (seed, iteration) and never of the number of processes, so one
process or several make the same optimizer steps (tests/test_parity.py).
"""

from __future__ import annotations

import torch


def prompt_order(n_prompts: int, batch: int, iteration: int, seed: int) -> list[int]:
    """The prompts of one iteration's global batch: epochs over the prompts, each a fresh permutation."""
    start = iteration * batch
    rows, epoch = [], start // n_prompts
    while len(rows) < batch:
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        offset = start + len(rows) - epoch * n_prompts
        rows += perm[offset : offset + batch - len(rows)]
        epoch += 1
    return rows


def rank_episodes(rollout_batch: int, minibatch: int, world_size: int, rank: int) -> list[int]:
    """Positions in the global rollout batch of process ``rank``'s episodes, in its local order.

    Global minibatch b holds positions [b * minibatch, (b + 1) * minibatch); each process gets an
    equal share of every one (``minibatch / world_size`` consecutive positions), so local
    minibatch b on every process together is global minibatch b, and any number of processes
    makes the same optimizer steps as one.
    """
    local = minibatch // world_size
    return [b * minibatch + rank * local + k for b in range(rollout_batch // minibatch) for k in range(local)]


def shuffled_local_order(rollout_batch: int, minibatch: int, world_size: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Local episode indices of a later PPO epoch: new minibatches that are the same for any
    number of processes. Episodes move between minibatches but keep their position within one
    (so they stay on their process): each position p gets its own permutation of the minibatches,
    drawn by every process alike."""
    n_minibatches, local = rollout_batch // minibatch, minibatch // world_size
    perms = [torch.randperm(n_minibatches, generator=generator) for _ in range(minibatch)]
    return torch.tensor([int(perms[rank * local + k][b]) * local + k for b in range(n_minibatches) for k in range(local)])


def episode_seed(seed: int, iteration: int, episode: int) -> int:
    """The sampling seed of one episode (its position in the global batch of ``iteration``)."""
    return (seed * 1_000_003 + iteration) * 1_000_033 + episode
