"""Pretrain the small base model from scratch on the world's corpus: it stands in for GPT-3.

setup (world, tokenizer, packed corpus, model) -> loop (shared ``fit``) -> save (final/).
"""

from __future__ import annotations

from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.jsonl import read_jsonl
from instructrl.data.packing import pack_documents
from instructrl.errors import UserError
from instructrl.models.base import build_base_model, count_parameters, count_text, load_tokenizer, set_dropout
from instructrl.models.tokenizer import train_tokenizer
from instructrl.rlmath import next_token_nll
from instructrl.rundir.files import replace_dir
from instructrl.rundir.locks import releases_on_error
from instructrl.rundir.run import RunDir
from instructrl.training.checkpoint import sizes_for_resuming
from instructrl.training.loop import fit, make_accelerator, prepare_training, seed_everything
from instructrl.training.progress import plural
from instructrl.world.build import SPLITS, WorldFiles, build_world

SECTIONS = ("run", "world", "tokenizer", "model", "pretrain")


def tokenizer_texts(world) -> list[str]:
    """What the BPE is trained on: the corpus and the instruction-format texts of every split."""
    texts = world.corpus.read_text().splitlines()
    for split in SPLITS:
        texts += [m["content"] for _, record in read_jsonl(world.prompts(split)) for m in record["messages"]]
    texts += [m["content"] for _, record in read_jsonl(world.demonstrations) for m in record["messages"]]
    return texts


@releases_on_error
def run_pretrain(config: PipelineConfig, restart: bool = False, log=print) -> Path:
    """Train a byte-level BPE and the base model on the world's corpus, into ``run.dir``/pretrain;
    returns the saved model's folder (final/).
    A run finished with the same config and inputs is skipped, an interrupted one resumes
    (``restart`` discards it instead); ``log`` takes each line the stage reports."""
    from accelerate.utils import broadcast_object_list

    cfg = config.pretrain
    if cfg.block_size > config.model.max_length:
        raise UserError(f"config: pretrain.block_size ({cfg.block_size}) exceeds model.max_length ({config.model.max_length})")
    accelerator = make_accelerator(cfg, "pretrain")
    run = RunDir(config, "pretrain", SECTIONS, accelerator.is_main_process, accelerator.num_processes)
    if run.skip(restart, log):  # whatever the process count: a finished run trains nothing
        return run.path / "final"
    with sizes_for_resuming(run.path / "checkpoints", accelerator.num_processes):
        cfg.grad_accum(accelerator.num_processes, "pretrain")  # sizes must divide before anything is written

    # setup: the world and the tokenizer (an interrupted run's, else trained anew) are the main process's,
    # written for all to read; the corpus must hold one batch before the run folder is written, or the
    # fixed config would find it holding a run of another config
    world_dir, tokenizer_dir = Path(config.run.dir) / "world", run.path / "tokenizer"
    n_blocks = [0]
    if accelerator.is_main_process:
        world = build_world(config.world, world_dir, replace=restart)
        resumed = tokenizer_dir.is_dir() and not restart  # --restart discards it
        tokenizer = load_tokenizer(tokenizer_dir) if resumed else train_tokenizer(tokenizer_texts(world), config.tokenizer.vocab_size)
        n_blocks = [len(pack_documents(tokenizer, world.corpus.read_text().splitlines(), cfg.block_size))]
    broadcast_object_list(n_blocks)
    with sizes_for_resuming(run.path / "checkpoints", accelerator.num_processes):
        cfg.check_fits(n_blocks[0], accelerator.num_processes, str(WorldFiles(world_dir).corpus), "corpus blocks", "pretrain")
    run.start(restart, log)
    if accelerator.is_main_process and not tokenizer_dir.is_dir():
        tmp = tokenizer_dir.with_name("tokenizer.tmp")
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, tokenizer_dir)
    accelerator.wait_for_everyone()
    world = build_world(config.world, world_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    run.write_lineage({"corpus": world.corpus, "tokenizer": tokenizer_dir})
    blocks = pack_documents(tokenizer, world.corpus.read_text().splitlines(), cfg.block_size)

    seed_everything(config.run.seed)  # same initial weights in every process
    model = build_base_model(config.model, tokenizer)
    set_dropout(model, cfg.dropout)
    setup = prepare_training(accelerator, model, cfg, len(blocks), config.run.seed)
    log(f"pretrain: {count_text(count_parameters(model))} parameters, {len(blocks)} blocks of {cfg.block_size} tokens, "
        f"{plural(setup.total_steps, 'step')} on {plural(accelerator.num_processes, 'process')}")

    def make_batch(indices: list[int]) -> dict:
        ids = blocks[indices].to(accelerator.device)
        return {"input_ids": ids, "n_targets": ids.numel() - len(indices)}

    def loss_fn(model, batch) -> torch.Tensor:
        ids = batch["input_ids"]
        return next_token_nll(model(input_ids=ids).logits, ids, torch.ones_like(ids))[0]

    # loop + save
    fit(accelerator=accelerator, setup=setup, tokenizer=tokenizer, make_batch=make_batch, loss_fn=loss_fn, config=cfg, run=run,
        description="pretrain", log=log)
    run.finish({"model": run.path / "final"})
    log(f"pretrain: base model saved to {run.path / 'final'}")
    return run.path / "final"
