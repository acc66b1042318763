"""A project's tasks from a prompts file, a model checkpoint or collected comparisons.

write: one task per prompt. rank: K responses per prompt sampled from a checkpoint the way
``instructrl collect`` samples them (temperature 1, no truncation), or the responses of an
existing comparisons file (``instructrl collect``'s output). compare: two models' greedy answers.
Models load only here, so the app itself never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from instructrl.data.formats import Prompt
from instructrl.data.inputs import read_comparisons, read_prompts
from instructrl.errors import UserError, located


def write_tasks(prompts: list[Prompt]) -> list[dict]:
    return [{"kind": "write", "prompt_id": p.id, "prompt": p.messages, "responses": [], "sources": []} for p in prompts]


def rank_tasks_from_model(prompts: list[Prompt], model: str, k: int, seed: int = 0, temperature: float = 1.0,
                          max_new_tokens: int = 64) -> list[dict]:
    """K sampled responses per prompt, as ``instructrl collect`` samples them."""
    import torch

    from instructrl.evaluation.generate import generate_answers
    from instructrl.models.base import load_answering_model, load_tokenizer

    with located("--model"):
        lm, tokenizer = load_answering_model(model), load_tokenizer(model)
    torch.manual_seed(seed)
    samples = generate_answers(lm, tokenizer, [p.messages for p in prompts], max_new_tokens, num_samples=k, temperature=temperature,
                               key="--max-new-tokens")
    return [{"kind": "rank", "prompt_id": p.id, "prompt": p.messages, "responses": s, "sources": [f"{model}#sample{i}" for i in range(k)]}
            for p, s in zip(prompts, samples)]


def rank_tasks_from_comparisons(path: Path) -> list[dict]:
    """The prompts and responses of a comparisons file (e.g. collect/comparisons.jsonl), to be ranked again by people."""
    return [{"kind": "rank", "prompt_id": r.id, "prompt": [m.model_dump() for m in r.prompt], "responses": list(r.responses),
             "sources": [f"{Path(path).name}:{r.id}#{i}" for i in range(len(r.responses))]} for r in read_comparisons(path, key="--responses")]


def compare_tasks(prompts: list[Prompt], models: dict[str, str], max_new_tokens: int = 64) -> list[dict]:
    """Both models' greedy answers to each prompt; ``models`` maps a name to a checkpoint."""
    from instructrl.evaluation.generate import generate_answers
    from instructrl.models.base import load_answering_model, load_tokenizer

    if len(models) != 2:
        raise UserError(f"compare tasks need exactly two models (NAME=PATH), got {len(models)}")
    tokenizers = {}
    for name, path in models.items():  # a missing model fails now, not after the other answered
        with located(f"--compare {name}"):
            tokenizers[name] = load_tokenizer(path)
    answers = {}
    for name, path in models.items():
        with located(f"--compare {name}"):
            model = load_answering_model(path)
        answers[name] = generate_answers(model, tokenizers[name], [p.messages for p in prompts], max_new_tokens, key="--max-new-tokens")
    names = list(models)
    return [{"kind": "compare", "prompt_id": p.id, "prompt": p.messages, "responses": [answers[names[0]][i], answers[names[1]][i]],
             "sources": names} for i, p in enumerate(prompts)]


def load_prompts(path: Path, limit: int | None = None) -> list[Prompt]:
    prompts = read_prompts(path, key="--prompts")
    return prompts if limit is None else prompts[:limit]
