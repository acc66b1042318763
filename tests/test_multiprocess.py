"""SFT in two CPU processes (gloo) under ``torchrun``: it trains, each process sees its own data, and bad input stops every process with one message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import SMOKE, cli

import pytest
import torch

from instructrl.config import load_config
from instructrl.models.base import load_causal_lm, load_tokenizer
from instructrl.padding import pad_sequences
from instructrl.rlmath import next_token_nll
from instructrl.stages.sft import load_demonstrations
from instructrl.training.data_order import DataOrder
from ports import free_port


@torch.no_grad()
def demonstration_loss(model_dir: Path, demos: Path) -> float:
    """Mean next-token NLL of the assistant tokens of every demonstration."""
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    examples, _ = load_demonstrations(demos, tokenizer, max_length=128)
    ids, attention = pad_sequences([e.input_ids for e in examples], tokenizer.pad_token_id, side="right")
    targets, _ = pad_sequences([e.assistant_mask for e in examples], 0, side="right")
    total, count = next_token_nll(model(input_ids=ids, attention_mask=attention).logits, ids, targets)
    return (total / count).item()


def test_sft_in_two_processes(tmp_path, smoke_base):
    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", f"sft.model={smoke_base / 'pretrain' / 'final'}", "sft.epochs=2", "sft.record_data_order=true"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, "-m", "instructrl", "sft", "-c", str(SMOKE), *overrides],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sft = run_dir / "sft"
    assert (sft / "final" / "model.safetensors").is_file()
    assert json.loads((sft / "run.json").read_text())["processes"] == 2

    # it trains: the demonstrations' loss is lower under the trained model than under its parent
    demos = run_dir / "world" / "demonstrations.jsonl"
    assert demonstration_loss(sft / "final", demos) < demonstration_loss(smoke_base / "pretrain" / "final", demos)

    # each process trained on its own half of every global batch
    rank0 = [json.loads(l) for l in (sft / "data_order.rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(l) for l in (sft / "data_order.rank1.jsonl").read_text().splitlines()]
    assert len(rank0) == len(rank1) > 0
    cfg = load_config(SMOKE, overrides).sft
    n_demos = sum(1 for _ in (run_dir / "world" / "demonstrations.jsonl").open())
    order = DataOrder(n_demos, cfg.batch_size, cfg.micro_batch_size, cfg.grad_accum(2), 0, 2, 0)
    for a, b in zip(rank0, rank1):
        seen0 = [i for micro in a["indices"] for i in micro]
        seen1 = [i for micro in b["indices"] for i in micro]
        assert not set(seen0) & set(seen1)
        assert sorted(seen0 + seen1) == sorted(order.global_batch(a["step"]))


RANK_1_FAILS = """
import os
import sys

from instructrl import cli
from instructrl.errors import UserError
from instructrl.rundir.run import RunDir

if os.environ["RANK"] == "1":  # a bad line in a file only this process reads, while rank 0 goes on into the collectives
    def start(self, *args, **kwargs):
        raise UserError("demos.jsonl:35: only rank 1 reads this line")

    RunDir.start = start
cli.run()
"""


@pytest.mark.slow
def test_bad_input_that_one_process_or_every_process_meets_is_said_once_and_stops_the_launch(tmp_path, smoke_base):
    from test_parity import _launch

    def our_lines(stderr: str) -> list[str]:
        # the other process, stopped in its wake (a broken collective, then the launcher's SIGTERM), says nothing
        assert "Connection closed by peer" not in stderr and "KeyboardInterrupt" not in stderr
        return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:", "terminated:"))]

    sft = ["sft", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"sft.model={smoke_base / 'pretrain' / 'final'}"]
    script = tmp_path / "rank_1_fails.py"
    script.write_text(RANK_1_FAILS)
    proc = _launch(str(script), *sft, check=False)
    assert proc.returncode != 0
    assert our_lines(proc.stderr) == ["error: demos.jsonl:35: only rank 1 reads this line"]
    assert "traceback : error: demos.jsonl:35: only rank 1 reads this line" in proc.stderr  # the launcher's summary names it

    broken = tmp_path / "demos.jsonl"
    lines = (smoke_base / "world" / "demonstrations.jsonl").read_text().splitlines()
    broken.write_text("\n".join(lines[:10] + [lines[10][:40]] + lines[11:]) + "\n")
    # in a folder of its own: the first launch's folder holds a run of another config (sft.data), refused before the data is read
    proc = _launch("-m", "instructrl", *sft, f"run.dir={tmp_path / 'run2'}", f"sft.data={broken}", check=False)
    assert proc.returncode != 0
    assert len(our_lines(proc.stderr)) == 1 and our_lines(proc.stderr)[0].startswith(f"error: {broken}:11: ")


STOP_AFTER_FIRST_CHECKPOINT = """
import os

from instructrl import cli
from instructrl.training import loop

save = loop.save_checkpoint


def save_then_stop(*args, **kwargs):  # every process, once the checkpoint is complete: a pre-empted job
    save(*args, **kwargs)
    os._exit(0)


loop.save_checkpoint = save_then_stop
cli.run()
"""


@pytest.mark.slow
def test_a_run_resumed_on_another_number_of_processes_ends_as_an_uninterrupted_one(tmp_path, smoke_base):
    """Without dropout, SFT stopped at its first checkpoint in 1 process and resumed in 2 (or the
    reverse) ends with the weights of an uninterrupted 1-process run, and the log says the count changed."""
    from test_parity import _assert_same_weights, _launch

    script = tmp_path / "stop_after_first_checkpoint.py"
    script.write_text(STOP_AFTER_FIRST_CHECKPOINT)
    sft = ["sft", "-c", str(SMOKE), f"sft.model={smoke_base / 'pretrain' / 'final'}", f"sft.data={smoke_base / 'world' / 'demonstrations.jsonl'}",
           "sft.dropout=0", "sft.epochs=2"]
    cli(*sft, f"run.dir={tmp_path / 'straight'}")
    one_process = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, check=True)  # noqa: E731
    for first, then, written, resumed in [(one_process, _launch, "1 process", 2), (_launch, one_process, "2 processes", 1)]:
        run_dir = tmp_path / f"{written[0]}-to-{resumed}"
        first(str(script), *sft, f"run.dir={run_dir}")
        assert not (run_dir / "sft" / "final").exists()
        checkpoint = next((run_dir / "sft" / "checkpoints").glob("step-*"))
        stderr = then("-m", "instructrl", *sft, f"run.dir={run_dir}").stderr
        assert f"sft: {checkpoint} was written by {written} and this run has {resumed}: weights, optimizer" in " ".join(stderr.split())
        _assert_same_weights(tmp_path / "straight" / "sft" / "final", run_dir / "sft" / "final")


@pytest.mark.slow
def test_the_pipeline_counts_its_cpu_processes_and_names_a_checkpoint_of_another_count(tmp_path):
    """Under torchrun on CPU the pipeline is one run of 2 gloo processes, not 2 runs of one each:
    its up-front size check counts 2, and names the checkpoint of 1 process it would resume."""
    checkpoint = tmp_path / "run" / "sft" / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "processes": 1}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, "-m", "instructrl", "pipeline", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", "sft.batch_size=12"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: config: sft.batch_size (12) must be a multiple of sft.micro_batch_size x 2 processes (8); the checkpoint {checkpoint} was "
        "written by 1 process and this run has 2: resume it with 1 process, or pass --restart-from sft with sizes that divide"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["sft"]  # no stage ran


A_STAGE_THEN_EXIT = """
import os

import torch
import torch.distributed as dist

from instructrl.cli import exits


def stage():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    STAGE_BODY


exits.app = stage
exits.run()
threads = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
print("gloo threads left:", sum("gloo" in name for name in threads))
"""

# as under a launcher: Accelerate creates the group, then loading a tokenizer imports torch.distributed.nn
IMPORTS_TORCH_DISTRIBUTED_NN = """
import torch.distributed.nn  # noqa: F401
dist.all_reduce(torch.ones(1))
"""

# as Accelerate's FSDP2 does: torch's DTensor caches keep the mesh, which holds the group, and the
# sharded model is left in reference cycles
SHARDS_A_MODEL_WITH_FSDP2 = """
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

model = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)), mesh=init_device_mesh("cpu", (1,)))
model(torch.ones(2, 4)).sum().backward()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize("stage", [IMPORTS_TORCH_DISTRIBUTED_NN, SHARDS_A_MODEL_WITH_FSDP2], ids=["torch.distributed.nn", "fsdp2"])
def test_the_process_group_is_freed_before_the_interpreter_exits(tmp_path, stage):
    """Whatever still holds the group after destroy_process_group keeps gloo's worker threads running
    into the interpreter's teardown, where one taking the GIL (releasing the last collective's tensors,
    running a completion callback) aborts the finished process now and then ("terminate called without
    an active exception"; the pipeline's rank 1, 2-process FSDP stages on CPU). Holders: torch.distributed.nn
    imported after the group exists (its functions' default argument); every DeviceMesh FSDP2 used, which
    DTensor's caches keep; FSDP2's reference cycles."""
    script = tmp_path / "a_stage_then_exit.py"
    body = textwrap.indent(stage.strip(), "    ")
    script.write_text(A_STAGE_THEN_EXIT.replace("    STAGE_BODY", body))
    # WORLD_SIZE as a launcher of 2 processes sets it; the group itself has this one process
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=dict(os.environ, WORLD_SIZE="2"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "gloo threads left: 0"


@pytest.mark.slow
def test_the_pipeline_in_two_processes_runs_to_the_end_and_again_skips_every_stage(tmp_path):
    """Under torchrun on CPU the pipeline trains in 2 gloo processes and evaluates in one; rank 1,
    leaving while rank 0 evaluates, exits cleanly. Run again on a world since deleted, every stage is skipped
    and one process rebuilds the world (both did, and the second was refused the world's lock)."""
    run_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    for attempt in ("first", "again"):
        if attempt == "again":
            shutil.rmtree(run_dir / "world")
        proc = subprocess.run([*launcher, "-m", "instructrl", "pipeline", "-c", str(SMOKE), f"run.dir={run_dir}"],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, (attempt, proc.stdout[-3000:] + proc.stderr[-3000:])
        assert proc.stderr.count("pipeline: finished") == 1 and "terminate called" not in proc.stderr
    skipped = [line.split(":")[0] for line in proc.stderr.splitlines() if "is complete with this config and inputs; nothing to do" in line]
    assert skipped == ["pretrain", "sft", "collect", "rm", "ppo_ptx", "ppo"]
    processes = {stage: json.loads((run_dir / stage / "run.json").read_text())["processes"]
                 for stage in ("pretrain", "sft", "collect", "rm", "ppo_ptx", "ppo", "eval")}
    assert processes == {"pretrain": 2, "sft": 2, "collect": 1, "rm": 2, "ppo_ptx": 2, "ppo": 2, "eval": 1}  # sampling and eval in one
    assert json.loads((run_dir / "eval" / "results.json").read_text())["results"].keys() >= {"sft", "ppo", "ppo_ptx"}
    assert (run_dir / "report.html").is_file() and (run_dir / "world" / "world.json").is_file()
