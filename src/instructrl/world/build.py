"""Write the built-in world to disk: prompt splits, demonstrations and the pretraining corpus.

Everything is a pure function of ``WorldConfig``; the same config always writes the same bytes,
but for world.json's record of the build (command line, versions), as a stage's run.json records its run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from instructrl.config import WorldConfig
from instructrl.data.jsonl import read_jsonl, write_jsonl
from instructrl.errors import UserError
from instructrl.rundir.files import write_text_atomic
from instructrl.rundir.identity import comparable
from instructrl.rundir.locks import rewriting
from instructrl.rundir.run import run_info
from instructrl.world.corpus import corpus_documents
from instructrl.world.labeler import DemoStyle, SimulatedLabeler
from instructrl.world.tasks import FAMILIES, Task, sample_task

# InstructGPT's prompt counts: ~13k SFT, ~33k RM, ~31k PPO (§3.3).
SPLIT_RATIOS = {"sft": 13, "rm": 33, "ppo": 31}
SPLITS = ("sft", "rm", "ppo", "val", "eval")


def split_sizes(config: WorldConfig) -> dict[str, int]:
    """How many prompts each split gets; the training splits share n_prompts 13 : 33 : 31."""
    total = sum(SPLIT_RATIOS.values())
    sizes = {name: config.n_prompts * ratio // total for name, ratio in SPLIT_RATIOS.items()}
    sizes["sft"] += config.n_prompts - sum(sizes.values())
    return {**sizes, "val": config.n_val, "eval": config.n_eval}


def make_splits(config: WorldConfig) -> dict[str, list[Task]]:
    """Draw distinct prompts and deal them into disjoint splits (no prompt text in two splits)."""
    sizes = split_sizes(config)
    wanted = sum(sizes.values())
    rng = random.Random(f"prompts:{config.seed}")
    tasks: dict[str, Task] = {}
    attempts = 0
    while len(tasks) < wanted:
        attempts += 1
        if attempts > 50 * wanted:
            raise UserError(f"config: the world has fewer than {wanted} distinct prompts; lower world.n_prompts")
        task = sample_task(rng, config.multi_turn_rate)
        tasks.setdefault(task.id, task)
    pool = list(tasks.values())
    rng.shuffle(pool)
    splits, start = {}, 0
    for name in SPLITS:
        splits[name] = pool[start : start + sizes[name]]
        start += sizes[name]
    return splits


def demo_labeler(config: WorldConfig) -> SimulatedLabeler:
    style = DemoStyle(config.demo_error_rate, config.demo_off_format_rate, config.demo_verbose_rate)
    return SimulatedLabeler("demonstrator", noise=0.0, style=style)


def demonstration(config: WorldConfig, task: Task) -> str:
    """The demonstrator's answer to a task: fixed by the world seed and the task alone."""
    return demo_labeler(config).demonstrate(task, random.Random(f"demo:{config.seed}:{task.id}"))


@dataclass(frozen=True)
class WorldFiles:
    """Where a written world lives."""

    root: Path

    def prompts(self, split: str) -> Path:
        return self.root / "prompts" / f"{split}.jsonl"

    @property
    def demonstrations(self) -> Path:
        return self.root / "demonstrations.jsonl"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.txt"

    @property
    def heldout_corpus(self) -> Path:
        return self.root / "corpus_heldout.txt"

    @property
    def manifest(self) -> Path:
        return self.root / "world.json"


def build_world(config: WorldConfig, root: Path, replace: bool = False) -> WorldFiles:
    """Write the world under ``root`` unless the same config already wrote it there. A world of
    another config is replaced only when ``replace`` is set: the run's stages were trained on it."""
    files = WorldFiles(Path(root))
    wanted = config.model_dump(mode="json")
    if files.manifest.is_file():
        # as a stage's identity is compared: a key the world's config no longer has (labeler_noise, read by collect) is left out
        now, then = comparable(wanted, json.loads(files.manifest.read_text()).get("config", {}), WorldConfig().model_dump(mode="json"))
        if now == then:
            return files
        if not replace:
            changed = ", ".join(f"world.{k}: {then[k]!r} -> {v!r}" for k, v in now.items() if then[k] != v)
            raise UserError(f"{files.root} holds the world of another config ({changed}), which this run's stages learnt from; "
                            "set run.dir to another folder, or rebuild it with `instructrl world --restart` "
                            "(`instructrl pipeline --restart-from pretrain`)")
    with rewriting(files.root):  # not under a stage that reads it, nor beside another rebuild
        files.manifest.unlink(missing_ok=True)  # a half-rebuilt world must not pass for the old one
        splits = make_splits(config)
        for name, tasks in splits.items():
            write_jsonl(files.prompts(name), (t.to_record() for t in tasks))
        write_jsonl(files.demonstrations, (
            {"id": t.id, "family": t.family, "messages": [*t.messages, {"role": "assistant", "content": demonstration(config, t)}]}
            for t in splits["sft"]
        ))
        docs = corpus_documents(config.corpus_documents + config.heldout_documents, config.seed)
        write_text_atomic(files.corpus, "\n".join(docs[config.heldout_documents :]) + "\n")
        write_text_atomic(files.heldout_corpus, "\n".join(docs[: config.heldout_documents]) + "\n")
        counts = {name: len(tasks) for name, tasks in splits.items()}
        write_text_atomic(files.manifest, json.dumps({"config": wanted, "counts": counts, **run_info(config.seed)}, indent=2))
    return files


def build_world_once(config: WorldConfig, root: Path, accelerator) -> WorldFiles:
    """``build_world`` for a stage of several processes: the main one writes the world while the
    others wait (two processes writing the same files would race), then every process reads it."""
    if accelerator.is_main_process:
        build_world(config, root)
    accelerator.wait_for_everyone()
    return build_world(config, root)


def load_tasks(path: Path | str) -> list[Task]:
    """The tasks of a world prompts file (``run.dir/world/prompts/<split>.jsonl``), for the labeler to judge answers to."""
    return [Task.from_record(record) for _, record in read_jsonl(path)]


def world_task(record: dict, messages: list[dict]) -> Task | None:
    """The built-in world's task a prompts file's record is, if it is one (a known family and a gold
    answer), holding ``messages``: the record's, as its Prompt holds them, so that they are kept once."""
    if record.get("family") in FAMILIES and {"id", "answer", "args", "messages"} <= set(record):
        return Task.from_record(record, messages)
    return None
