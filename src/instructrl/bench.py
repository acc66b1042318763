"""``instructrl bench``: a short PPO run on a fixed setup, timed.

The policy is a randomly initialised model shaped by the config's ``model`` section (so the same
command measures the 1M-parameter default on a laptop or a 1B model on a GPU), the reward and
value models share its backbone shape, and the prompts are the built-in world's. What it
measures is speed, not learning: the time split of each iteration (generation, the four scoring
passes, training), episodes and tokens per second, and peak memory. The first iteration is a
warm-up and is left out of the means.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from instructrl.config import PipelineConfig
from instructrl.data.jsonl import complete_lines
from instructrl.data.records import ComparisonRecord
from instructrl.errors import UserError, located
from instructrl.models.base import apply_switches, build_base_model, count_parameters, count_text, load_causal_lm
from instructrl.models.lora import add_lora
from instructrl.models.reward import RewardModel
from instructrl.models.tokenizer import train_tokenizer
from instructrl.padding import pad_sequences
from instructrl.rlmath import kway_ranking_loss
from instructrl.rundir.files import write_text_atomic
from instructrl.rundir.locks import releases_on_error
from instructrl.rundir.run import RunDir
from instructrl.stages.ppo import run_ppo
from instructrl.stages.pretrain import tokenizer_texts
from instructrl.stages.rm import encode_comparison
from instructrl.training.loop import make_optimizer
from instructrl.world.build import build_world, demo_labeler, load_tasks
from instructrl.world.labeler import SimulatedLabeler, ranks_from_qualities


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory when there is a GPU), in MiB."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if torch.cuda.is_available():
        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


MARK = ".instructrl-bench"  # in a run folder that bench made: its PPO folder may be written over


def claim_bench_dir(root: Path) -> None:
    """Make ``root`` a bench folder; a folder holding a trained run is refused, as bench replaces its PPO run."""
    trained = [stage for stage in ("pretrain", "sft", "rm", "ppo_ptx", "ppo") if (root / stage).exists()]
    if trained and not (root / MARK).is_file() and not (root / "models").is_dir():  # models/: a bench folder of an older version
        raise UserError(f"bench: {root} holds a trained run ({', '.join(trained)}), which bench would write over; "
                        "give bench a run.dir of its own (by default runs/bench)")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARK).touch()


def run_bench(config: PipelineConfig, iterations: int, log=print) -> dict:
    root = Path(config.run.dir)
    claim_bench_dir(root)
    world = build_world(config.world, root / "world")
    m = config.model  # one folder per model shape, so a changed model.* never reuses other weights
    models = root / "models" / f"{m.arch}-{m.n_layer}x{m.hidden_size}-h{m.n_head}-L{m.max_length}-v{config.tokenizer.vocab_size}-s{config.run.seed}"
    if not (models / "policy").is_dir():
        log("bench: training the tokenizer and building random models")
        tokenizer = train_tokenizer(tokenizer_texts(world), config.tokenizer.vocab_size)
        torch.manual_seed(config.run.seed)
        policy = build_base_model(config.model, tokenizer)
        for name, model in (("policy", policy), ("rm", RewardModel(build_base_model(config.model, tokenizer).base_model))):
            tmp = models / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(models / name, ignore_errors=True)
            tmp.rename(models / name)
    config = config.model_copy(deep=True)
    config.ppo.policy, config.ppo.reward_model = str(models / "policy"), str(models / "rm")
    config.ppo.episodes = iterations * config.ppo.rollout_batch_size
    config.ppo.checkpoint_every = iterations + 1  # no checkpoints: they are not what is measured
    stage_dir = root / ("ppo_ptx" if config.ppo.ptx_coef > 0 else "ppo")
    shutil.rmtree(stage_dir, ignore_errors=True)
    run_ppo(config, restart=True, log=log)
    rows = [record for _, record in complete_lines(stage_dir / "metrics.jsonl")]
    timed = rows[1:] or rows  # the first iteration pays for warm-up
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    phases = sorted(k[len("time/"):] for k in timed[0] if k.startswith("time/") and not k.endswith("_per_s"))
    per_iteration = {p: mean(f"time/{p}") for p in phases}
    total = sum(per_iteration.values())
    # rates over the timed iterations together (not the mean of each one's rate), so the table adds up:
    # episodes/s is the episodes of an iteration over its seconds above
    tokens = sum(r["time/tokens_per_s"] * sum(r[f"time/{p}"] for p in phases) for r in timed) / len(timed)
    result = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "policy_parameters": count_parameters(load_causal_lm(models / "policy")),
        "iterations_timed": len(timed),
        "rollout_batch_size": config.ppo.rollout_batch_size,
        "max_new_tokens": config.ppo.max_new_tokens,
        "ptx_coef": config.ppo.ptx_coef,
        "mixed_precision": config.ppo.mixed_precision,
        "lora": config.ppo.lora.enabled,
        "seconds_per_iteration": per_iteration,
        "share": {p: v / total for p, v in per_iteration.items()},
        "episodes_per_s": config.ppo.rollout_batch_size / total,
        "tokens_per_s": tokens / total,  # prompt and response tokens
        **peak_memory_mb(),
        # what the four models and the two optimizers hold (LoRA: one base model for policy and reference)
        **{key[len("memory/"):]: value for key, value in rows[-1].items() if key.startswith("memory/")},
    }
    write_text_atomic(root / "bench.json", json.dumps(result, indent=2))
    return result


def bench_table(result: dict):
    from rich.table import Table

    table = Table(title=f"PPO bench: {count_text(result['policy_parameters'])}-parameter policy on {result['device']}, "
                        f"{result['rollout_batch_size']} episodes per iteration")
    table.add_column("phase")
    table.add_column("s / iteration", justify="right")
    table.add_column("share", justify="right")
    for phase, seconds in result["seconds_per_iteration"].items():
        table.add_row(phase, f"{seconds:.3f}", f"{result['share'][phase]:.0%}")
    table.add_row("[bold]episodes / s", f"[bold]{result['episodes_per_s']:.1f}", "", end_section=False)
    table.add_row("tokens / s (prompt + response)", f"{result['tokens_per_s']:.0f}", "")
    for key in ("peak_rss_mb", "peak_gpu_mb", "parameters_mb", "optimizer_state_mb"):
        if key in result:
            table.add_row(key.replace("_", " "), f"{result[key]:.1f}", "")
    return table


def bench_rm_table(result: dict):
    from rich.table import Table

    table = Table(title=f"RM bench: {count_text(result['model_parameters'])}-parameter reward model, {result['comparisons']} comparisons "
                        f"of K = {result['k']} ({result['ranked_pairs']} ranked pairs)")
    for column in ("batches of", "seconds", "sequences forwarded", "comparisons / s"):
        table.add_column(column, justify="right" if column != "batches of" else "left")
    for mode, label in (("kway", "K-way comparisons"), ("pairwise", "independent pairs")):
        r = result[mode]
        table.add_row(label, f"{r['seconds']:.2f}", str(r["sequences_forwarded"]), f"{r['comparisons_per_s']:.1f}")
    table.add_row("[bold]K-way speed-up", "", "", f"[bold]{result['speedup']:.2f}x")
    return table


def gold_ranked_comparisons(config: PipelineConfig, world, k: int, n_comparisons: int) -> list[ComparisonRecord]:
    """``n_comparisons`` comparisons of the world's RM prompts: K demonstration-style answers each, ranked by the gold labeler."""
    gold = SimulatedLabeler()
    writers = [SimulatedLabeler(f"writer{i}", style=demo_labeler(config.world).style) for i in range(k)]
    records = []
    for task in load_tasks(world.prompts("rm"))[:n_comparisons]:
        rng = random.Random(task.id)
        responses = [w.demonstrate(task, rng) for w in writers]
        ranks = ranks_from_qualities([gold.judge(task, r).quality for r in responses])
        records.append(ComparisonRecord(id=task.id, prompt=list(task.messages), responses=responses, ranks=ranks, labeler_id="gold"))
    return records


Unit = tuple[list[list[int]], list[int]]  # (sequences, ranks): one comparison of K, or one pair cut out of it


def time_ranking_loss_training(config: PipelineConfig, tokenizer, units: list[Unit], per_step: int, micro: int) -> dict:
    """Train a random reward model on ``units``, ``per_step`` per optimizer step in micro-batches of
    ``micro``, with the rm section's optimizer, switches and LoRA: seconds, units trained, sequences
    forwarded and the model's parameter counts."""
    torch.manual_seed(config.run.seed)
    model = RewardModel(build_base_model(config.model, tokenizer).base_model)
    apply_switches(model.backbone, config.rm, "rm")
    if config.rm.lora.enabled:
        with located("rm.lora.target_modules"):
            model.backbone = add_lora(model.backbone, config.rm.lora)
    optimizer = make_optimizer(model, config.rm)
    start, sequences, trained = time.perf_counter(), 0, 0
    for step_start in range(0, len(units) - per_step + 1, per_step):
        trained += per_step
        for m in range(step_start, step_start + per_step, micro):
            chunk = units[m : m + micro]
            width = max(len(seqs) for seqs, _ in chunk)
            ids, mask = pad_sequences([s for seqs, _ in chunk for s in seqs], tokenizer.pad_token_id, side="right")
            valid = torch.zeros(len(chunk), width, dtype=torch.long)
            ranks = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, (seqs, r) in enumerate(chunk):
                valid[b, : len(seqs)] = 1
                ranks[b, : len(seqs)] = torch.tensor(r)
            rewards = torch.zeros(len(chunk), width)
            rewards[valid.bool()] = model(ids, mask)
            loss, _ = kway_ranking_loss(rewards, ranks, valid)
            (loss / per_step).backward()
            sequences += ids.shape[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - start, "trained": trained, "sequences_forwarded": sequences, "parameters": count_parameters(model),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


@releases_on_error
def bench_rm(config: PipelineConfig, k: int, n_comparisons: int, log=print) -> dict:
    """Reward-model training throughput: K-way batches against the same comparisons as independent pairs.

    Both modes train the same random model with the same loss on the same comparisons (K
    demonstration-style answers per RM prompt, ranked by the gold labeler) and batch size
    (rm.batch_size comparisons per step, split in micro-batches of rm.micro_batch_size). K-way
    forwards each response once per comparison; the pairwise expansion forwards both responses
    of each of its C(K, 2) pairs, as trainers that consume pairs do.
    """
    if k < 2:
        raise UserError(f"bench rm: --k {k}: a comparison ranks at least 2 responses")
    if n_comparisons < config.rm.batch_size:
        raise UserError(f"bench rm: --comparisons {n_comparisons} is fewer than one batch (rm.batch_size = {config.rm.batch_size})")
    root = Path(config.run.dir)
    world = build_world(config.world, root / "world")
    tokenizer = train_tokenizer(tokenizer_texts(world), config.tokenizer.vocab_size)
    records = gold_ranked_comparisons(config, world, k, n_comparisons)
    if len(records) < config.rm.batch_size:
        raise UserError(f"bench rm: the world has {len(records)} RM prompts, fewer than one batch (rm.batch_size = {config.rm.batch_size})")
    kway = [(encode_comparison(tokenizer, r), r.ranks) for r in records]
    pairs = [([seqs[i], seqs[j]], [0, 1]) for seqs, ranks in kway for i in range(k) for j in range(k) if ranks[i] < ranks[j]]

    run = RunDir(config, "bench_rm", ("run", "world", "tokenizer", "model", "rm"))
    run.start(restart=True)  # the config and seed of these figures, as every run records them; each bench replaces the last
    run.record_start()

    batch, micro = config.rm.batch_size, config.rm.micro_batch_size
    log(f"bench rm: {len(records)} comparisons of K = {k} ({len(pairs)} ranked pairs), batch {batch}")
    by_kway = time_ranking_loss_training(config, tokenizer, kway, batch, micro)
    # the same comparisons as pairs: a step covers as many comparisons, C(K, 2) pairs each
    per_comparison = len(pairs) / len(records)
    pair_micro = micro * 2
    pair_batch = max(pair_micro, round(batch * per_comparison / pair_micro) * pair_micro)
    # rounded up to whole micro-batches, one batch of comparisons' pairs can outnumber all the pairs (--comparisons at
    # rm.batch_size, K = 6): a step takes them all then, rather than none being trained and the rate divided by zero
    pair_batch = min(pair_batch, len(pairs))
    by_pairs = time_ranking_loss_training(config, tokenizer, pairs, pair_batch, pair_micro)
    result = {
        "k": k, "comparisons": len(records), "ranked_pairs": len(pairs), "model_parameters": by_kway["parameters"],
        "trainable_parameters": by_kway["trainable_parameters"], "lora": config.rm.lora.enabled,
        "kway": {"seconds": by_kway["seconds"], "sequences_forwarded": by_kway["sequences_forwarded"],
                 "comparisons_per_s": by_kway["trained"] / by_kway["seconds"]},
        "pairwise": {"seconds": by_pairs["seconds"], "sequences_forwarded": by_pairs["sequences_forwarded"],
                     "comparisons_per_s": by_pairs["trained"] / per_comparison / by_pairs["seconds"],
                     "pairs_per_s": by_pairs["trained"] / by_pairs["seconds"]},
    }
    result["speedup"] = result["kway"]["comparisons_per_s"] / result["pairwise"]["comparisons_per_s"]
    write_text_atomic(root / "bench_rm.json", json.dumps(result, indent=2))
    run.finish({"results": root / "bench_rm.json"})
    return result
