"""The training loop the pretraining, SFT and reward-model stages share.

It runs on Hugging Face Accelerate, so the same code trains on one CPU, one GPU in bf16, or
several processes. Each optimizer step:

  1. takes this process's micro-batches for the step from ``DataOrder``;
  2. counts the loss targets of the whole step over all processes;
  3. forwards and backwards each micro-batch, scaling its summed loss by that global count
     (so 8 x 1 accumulation equals 1 x 8, and W processes equal one);
  4. clips, steps the optimizer and the schedule;
  5. logs, scores the model for checkpoint selection, and saves a resumable checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from instructrl.config import TrainConfig
from instructrl.errors import UserError
from instructrl.models.base import count_held_parameters, count_parameters
from instructrl.models.lora import save_full
from instructrl.rundir.files import copy_dir, replace_dir, trim_step_log
from instructrl.rundir.run import RunDir
from instructrl.training.checkpoint import TrainState, load_latest_checkpoint, save_checkpoint
from instructrl.training.data_order import DataOrder
from instructrl.training.progress import progress_bar


def without_gpu() -> bool:
    """Whether processes run on CPU: Accelerate must then be told (cpu=True), or each of the N processes
    that `torchrun --nproc_per_node N` starts is a run of its own rather than one of N gloo processes."""
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def make_accelerator(config: TrainConfig, section: str = ""):
    """The stage's Accelerator (``section``: the config section, to name its keys in an error)."""
    from accelerate import Accelerator

    check_precision(config.mixed_precision, section)
    _allow_precision(config.mixed_precision)
    # We step the schedule once per optimizer step ourselves: Accelerate would otherwise step
    # it once per process, changing the schedule with the number of processes.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, step_scheduler_with_optimizer=False, cpu=without_gpu())
    if accelerator.distributed_type == "MULTI_CPU" and _launched_with("ACCELERATE_USE_FSDP"):
        _shard_on_cpu(accelerator)
    if accelerator.distributed_type == "DEEPSPEED":
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, config)
    check_lora_unsharded(getattr(config, "lora", None), parallelism_of(accelerator))
    return accelerator


def check_precision(mixed_precision: str, section: str = "") -> None:
    """Refuse fp16 where no GPU runs the stage: Accelerate autocasts to fp16 on GPUs only, and on CPU would train in fp32 without a word."""
    if mixed_precision == "fp16" and without_gpu():
        key = f"{section}." if section else ""
        raise UserError(f"{key}mixed_precision = fp16 needs a GPU (on CPU it would train in fp32); use bf16, which CPUs autocast to, or no")


def _allow_precision(mixed_precision: str) -> None:
    """Let this process's next Accelerator take ``mixed_precision``. Accelerate keeps one state per process and
    refuses another precision once set ("restart your runtime"), but the stages of one pipeline may each have
    their own (sft.mixed_precision=bf16 after pretrain's "no"), as may a notebook's runs one after another. Its
    state is then dropped, keeping the processes' group (PartialState); under DeepSpeed its config sets the precision."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state  # empty until an Accelerator is made
    if state.get("_mixed_precision", mixed_precision) != mixed_precision and state.get("distributed_type") != DistributedType.DEEPSPEED:
        AcceleratorState._reset_state()


def _shard_on_cpu(accelerator) -> None:
    """Turn FSDP on for CPU (gloo) processes, as ``accelerate launch`` with an FSDP config asked.

    Accelerate turns FSDP on only for GPU-like devices and silently falls back to DDP on CPUs,
    although PyTorch's FSDP2 (``fully_shard``) runs on gloo; so we switch its state to FSDP with
    the launcher's FSDP settings, and ``prepare`` then shards as it does on GPUs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (see configs/accelerate/fsdp_cpu.yaml)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def configure_deepspeed(deepspeed_config: dict, config) -> None:
    """Fill in what DeepSpeed needs from the stage's config. Accelerate takes the micro-batch size
    from a DataLoader, which the stages do not use, and otherwise refuses to ``prepare``; and
    DeepSpeed clips gradients inside its own step, so it is given the stage's ``grad_clip``."""
    deepspeed_config["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    deepspeed_config["gradient_clipping"] = config.grad_clip


class Parallelism(NamedTuple):
    """How a stage's processes share its models: as its Accelerator runs them (``parallelism_of``), or will (``launched_parallelism``)."""

    distributed_type: str  # Accelerate's DistributedType: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ...
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage; None without DeepSpeed

    @property
    def shards_parameters(self) -> bool:
        """Whether prepared models are sharded over the processes (FSDP, DeepSpeed ZeRO-3): a forward
        pass of one then needs every process, and its full weights must be gathered to be saved."""
        return self.zero_stage == 3 if self.distributed_type == "DEEPSPEED" else self.distributed_type == "FSDP"


def parallelism_of(accelerator) -> Parallelism:
    """The parallelism ``accelerator`` runs the stage with."""
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    return Parallelism(accelerator.distributed_type, accelerator.state.deepspeed_plugin.zero_stage if deepspeed else None)


def launched_parallelism(state) -> Parallelism:
    """The parallelism ``make_accelerator`` will give the stages, told before there is an Accelerator (making one
    claims the devices and fixes the process's precision): from this process's ``state``, a PartialState made with
    cpu=without_gpu() as the stages' Accelerator is, and the variables ``accelerate launch`` set from its config
    file, read as Accelerate's AcceleratorState and the DeepSpeed plugin it makes read them."""
    from accelerate.utils import DeepSpeedPlugin

    if _launched_with("ACCELERATE_USE_DEEPSPEED") and not without_gpu():  # on CPU Accelerate runs without DeepSpeed
        return Parallelism("DEEPSPEED", DeepSpeedPlugin().zero_stage)  # ACCELERATE_DEEPSPEED_ZERO_STAGE, or its config file's
    if _launched_with("ACCELERATE_USE_FSDP") and state.distributed_type.startswith("MULTI_"):  # MULTI_CPU by _shard_on_cpu; not one process
        return Parallelism("FSDP")
    return Parallelism(state.distributed_type)


def _launched_with(variable: str) -> bool:
    """Whether ``accelerate launch`` set ``variable`` (ACCELERATE_USE_FSDP, ...), read as Accelerate reads it."""
    return os.environ.get(variable, "false").lower() == "true"


def shards_parameters(accelerator) -> bool:
    return parallelism_of(accelerator).shards_parameters


def check_lora_unsharded(lora, parallelism: Parallelism) -> None:
    """Refuse LoRA on parameters sharded over the processes: a checkpoint merges the adapter from unsharded weights.
    ``lora``: the stage's section (None for a stage without one). The pipeline checks it before its first stage too."""
    if lora is not None and lora.enabled and parallelism.shards_parameters:
        raise UserError("LoRA under FSDP is not supported (a checkpoint merges the adapter from unsharded weights); "
                        + ("it holds for DeepSpeed ZeRO-3 too; " if parallelism.distributed_type == "DEEPSPEED" else "")
                        + "use the ddp config, or full fine-tuning under FSDP")


@contextlib.contextmanager
def accumulating(accelerator, model, last: bool):
    """Around one micro-batch's forward and backward: gradients are synced between processes on
    the optimizer step's ``last`` micro-batch only; and DeepSpeed, whose engine steps the optimizer
    inside ``accelerator.backward`` while ``sync_gradients`` is set, steps only after the last."""
    if last:
        yield
        return
    accelerator.sync_gradients = False
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-d tensors) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, eps=config.adam_eps, betas=(0.9, 0.95))


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warm-up, then cosine decay from lr to min_lr_ratio * lr."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainingSetup:
    model: torch.nn.Module  # prepared by Accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: DataOrder
    total_steps: int
    seed: int  # the run's: process r starts from seed + r


def prepare_training(accelerator, model, config: TrainConfig, n_examples: int, seed: int, lengths: list[int] | None = None) -> TrainingSetup:
    """Data order, AdamW, warm-up + cosine schedule, and Accelerate's wrapping, for ``n_examples``
    (sizes checked beforehand with ``TrainConfig.check_fits``); with the examples' padded ``lengths``,
    each step's micro-batches group similar lengths.

    Seeds every process with seed + rank afterwards, so dropout and sampling differ per process.
    """
    order = DataOrder(n_examples, config.batch_size, config.micro_batch_size, config.grad_accum(accelerator.num_processes),
                      accelerator.process_index, accelerator.num_processes, seed, lengths)
    total_steps = order.total_steps(config.epochs)
    optimizer = make_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_everything(seed + accelerator.process_index)
    return TrainingSetup(model, optimizer, scheduler, order, total_steps, seed)


def full_state_dict(accelerator, model) -> dict:
    """A sharded model's full weights, gathered by every process onto the main one (empty on the
    others); a tied weight (GPT-2's LM head is its embeddings) under its first name only, as
    ``save_pretrained`` writes it."""
    state = accelerator.get_state_dict(model)
    first: dict[int, str] = {}
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


def save_model(accelerator, model, tokenizer, dest: Path) -> None:
    """``save_pretrained`` model and tokenizer to ``dest``, replacing it only once complete.
    A sharded model's full weights are gathered first, by every process."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model) if shards_parameters(accelerator) else None
    if accelerator.is_main_process:
        write_model(accelerator.unwrap_model(model), tokenizer, dest, state_dict)
    accelerator.wait_for_everyone()


def write_model(model, tokenizer, dest: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` model (a LoRA model merged, its adapter and tokenizer beside it) and tokenizer to
    ``dest``, from this process alone; ``dest`` is replaced only once complete."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_full(model, tmp, state_dict)
    tokenizer.save_pretrained(tmp)
    if (tmp / "adapter").is_dir():  # the adapter needs the tokenizer's size (a PAD added) to be loaded onto its base model
        tokenizer.save_pretrained(tmp / "adapter")
    replace_dir(tmp, dest)


def fit(
    *,
    accelerator,
    setup: TrainingSetup,
    tokenizer,
    make_batch: Callable[[list[int]], dict],
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    config: TrainConfig,
    run: RunDir,
    description: str,
    select: Callable[[torch.nn.Module], float] | None = None,
    select_every: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainState:
    """Train ``setup.model`` for ``setup.total_steps`` optimizer steps, resuming from the run's last checkpoint.

    ``make_batch(indices)`` builds a micro-batch dict holding ``n_targets`` (how many loss terms
    it has); ``loss_fn(model, batch)`` returns their *sum*. ``select(model)`` scores the model;
    the best-scoring weights become the output (InstructGPT chose its SFT checkpoint by score).
    Writes ``final/`` under the run directory and returns the last TrainState.
    """
    model, optimizer, scheduler, order, total_steps = setup.model, setup.optimizer, setup.scheduler, setup.order, setup.total_steps
    if select is not None and not select_every:
        raise ValueError("fit: select needs select_every")
    best = run.path / "best"
    accelerator.register_for_checkpointing(scheduler)
    state = load_latest_checkpoint(accelerator, run.path / "checkpoints", setup.seed, best, lambda line: log(f"{description}: {line}"))
    run.record_start()
    if state.step:
        log(f"{description}: resuming from the checkpoint of step {state.step}")
    run.trim_metrics(state.step)
    data_log = run.path / f"data_order.rank{accelerator.process_index}.jsonl" if config.record_data_order else None
    if data_log is not None:
        trim_step_log(data_log, state.step, keep_equal=False)
    if shards_parameters(accelerator):
        log(f"{description}: parameters sharded over {accelerator.num_processes} processes (FSDP): "
            f"this one holds {count_held_parameters(model)} of {count_parameters(model)} parameters")
    model.train()
    # a metric line's loss and throughput are over the steps since the previous line (or the resume), as HF Trainer's
    window_start, window_targets, window_loss = time.perf_counter(), 0.0, torch.zeros((), device=accelerator.device)
    with progress_bar(accelerator.is_main_process) as bar:
        task = bar.add_task(description, total=total_steps, completed=state.step, status="")
        while state.step < total_steps:
            # 1. this process's micro-batches
            indices = order.micro_batches(state.step)
            batches = [make_batch(ix) for ix in indices]
            if data_log is not None:
                with data_log.open("a") as f:
                    f.write(json.dumps({"step": state.step, "indices": indices}) + "\n")
            # 2. the loss targets of the whole optimizer step, over every process
            local_targets = torch.tensor(float(sum(b["n_targets"] for b in batches)), device=accelerator.device)
            global_targets = accelerator.reduce(local_targets, "sum").item()
            # 3. forward and backward, each micro-batch's sum scaled by the global count
            loss_sum = backward_micro_batches(accelerator, model, loss_fn, batches, global_targets)
            # 4. clip and step
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step takes (the scheduler's next is one step on)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            window_targets += global_targets
            window_loss += loss_sum
            # 5. log, select, checkpoint
            if state.step % config.log_every == 0 or state.step == total_steps:
                total_loss = accelerator.reduce(window_loss, "sum").item()
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": total_loss / max(window_targets, 1.0),
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "train/targets_per_s": window_targets / max(elapsed, 1e-9),
                }
                run.log(state.step, metrics)
                window_start, window_targets, window_loss = time.perf_counter(), 0.0, torch.zeros_like(window_loss)
                bar.update(task, status=f"loss {metrics['train/loss']:.3f}")
            if select is not None and (state.step % select_every == 0 or state.step == total_steps):
                model.eval()
                score = select(accelerator.unwrap_model(model))
                model.train()
                state.selection.append([state.step, score])
                run.log(state.step, {"select/score": score})
                if state.best_score is None or score > state.best_score:
                    state.best_score, state.best_step = score, state.step
                    save_model(accelerator, model, tokenizer, best)
                bar.update(task, status=f"score {score:.3f} (best {state.best_score:.3f} @ {state.best_step})")
            if state.step % config.checkpoint_every == 0 and state.step < total_steps:
                save_checkpoint(accelerator, run.path / "checkpoints", state, best if select is not None else None)
            bar.update(task, completed=state.step)
    final = run.path / "final"
    if select is None:
        save_model(accelerator, model, tokenizer, final)
    elif accelerator.is_main_process:
        copy_dir(best, final)
    accelerator.wait_for_everyone()
    return state


def backward_micro_batches(accelerator, model, loss_fn, batches: list[dict], global_targets: float) -> torch.Tensor:
    """Forward and backward each of one optimizer step's micro-batches, its summed loss scaled by
    the step's loss targets over all processes (DDP averages over processes, hence the factor);
    gradients are synced between processes on the last micro-batch only. Returns the summed loss."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        with accumulating(accelerator, model, last=i == len(batches) - 1):
            with accelerator.autocast():
                loss = loss_fn(model, batch)
            accelerator.backward(loss * accelerator.num_processes / max(global_targets, 1.0))
        loss_sum += loss.detach().float()
    return loss_sum
