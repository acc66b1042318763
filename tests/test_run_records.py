"""What a run leaves for a person watching it: metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math

from conftest import SMOKE, cli


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_logged_loss_is_the_mean_since_the_previous_line(tmp_path, smoke_base):
    """Every pretraining step has as many targets (blocks of one size), so a line written every 2n steps
    holds the mean of the two n-step means that a line every n steps shows, not the last step's alone."""
    from instructrl.config import load_config

    n = load_config(SMOKE).pretrain.log_every  # the session's smoke base model logged every n steps
    cli("pretrain", "-c", str(SMOKE), f"run.dir={tmp_path}", f"pretrain.log_every={2 * n}")
    every = {k: {row["step"]: row["train/loss"] for row in _rows(folder / "pretrain" / "metrics.jsonl")}
             for k, folder in ((n, smoke_base), (2 * n, tmp_path))}
    steps = [s for s in sorted(every[2 * n]) if s % (2 * n) == 0]  # (the last line may close a shorter window)
    assert len(steps) >= 3 and all(s - n in every[n] for s in steps)
    for step in steps:
        window = [every[n][step - n], every[n][step]]
        assert math.isclose(every[2 * n][step], sum(window) / 2, rel_tol=1e-5), (step, every[2 * n][step], window)
    assert every[2 * n][steps[1]] != every[n][steps[1]]  # the losses vary from step to step: the mean is not any one of them


def test_a_resumed_run_drops_the_tensorboard_events_a_killed_run_wrote_past_its_checkpoint(tmp_path):
    """Killed at step 10 (events flushed up to it) with its checkpoint at 6, resumed with another
    log_every: TensorBoard shows what metrics.jsonl holds, no step 8 of the killed run among the new ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from instructrl.config import load_config
    from instructrl.rundir.run import RunDir

    config = load_config(overrides=[f"run.dir={tmp_path}"])
    killed = RunDir(config, "sft", ("run", "sft"))
    killed.start()
    for step in (2, 4, 6, 8, 10):
        killed.log(step, {"train/loss": float(step)})
    killed._tb.flush()  # as a long run's writer has, before the kill
    resumed = RunDir(config, "sft", ("run", "sft"))
    resumed.start()
    resumed.trim_metrics(6)
    for step in (10, 15):  # log_every = 5 now
        resumed.log(step, {"train/loss": step + 0.5})
    resumed.finish({})
    events = EventAccumulator(str(tmp_path / "sft" / "tb"))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert shown == [(2, 2.0), (4, 4.0), (6, 6.0), (10, 10.5), (15, 15.5)]
    assert [(r["step"], r["train/loss"]) for r in _rows(tmp_path / "sft" / "metrics.jsonl")] == shown
