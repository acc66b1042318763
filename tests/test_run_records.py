"""What a run leaves for a person watching it: metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math

from conftest import SMOKE, cli


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_logged_loss_is_the_mean_since_the_previous_line(tmp_path):
    """Every pretraining step has as many targets (blocks of one size), so a line written every 4 steps
    holds the mean of the 4 steps' losses that a line every step shows, not the 4th step's alone."""
    every = {}
    for n in (1, 4):
        cli("pretrain", "-c", str(SMOKE), f"run.dir={tmp_path / str(n)}", f"pretrain.log_every={n}")
        every[n] = {row["step"]: row["train/loss"] for row in _rows(tmp_path / str(n) / "pretrain" / "metrics.jsonl")}
    for step in (4, 8, 12):
        window = [every[1][s] for s in range(step - 3, step + 1)]
        assert math.isclose(every[4][step], sum(window) / 4, rel_tol=1e-5), (step, every[4][step], window)
    assert every[4][8] != every[1][8]  # the losses vary from step to step: the mean is not any one of them
