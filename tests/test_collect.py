"""`instructrl collect`: K sampled responses per RM prompt, ranked by the simulated labelers."""

from __future__ import annotations

import json
import shutil

from conftest import SMOKE, cli

from instructrl.data.inputs import read_comparisons
from instructrl.world.build import load_tasks
from instructrl.world.labeler import PAPER_NOISE, SimulatedLabeler


def _collect(run_dir, smoke_base, *extra, check=True):
    return cli("collect", "-c", str(SMOKE), f"run.dir={run_dir}", f"collect.policy={smoke_base / 'pretrain' / 'final'}", *extra, check=check)


def test_collect_writes_ranked_records(smoke_collect):
    records = read_comparisons(smoke_collect / "collect" / "comparisons.jsonl")
    tasks = {t.id: t for t in load_tasks(smoke_collect / "world" / "prompts" / "rm.jsonl")}
    assert len(records) == len(tasks) == 171  # every smoke RM prompt (400 * 33 // 77)
    assert all(len(r.responses) == 4 for r in records)  # collect.k in smoke.yaml
    assert [r.labeler_id for r in records[:5]] == ["sim-0", "sim-1", "sim-2", "sim-3", "sim-0"]
    for record in records[:20]:
        # the ranking is the named labeler's: judging again reproduces it
        labeler = SimulatedLabeler(record.labeler_id, noise=PAPER_NOISE)
        assert labeler.rank(tasks[record.id], record.responses) == record.ranks
        assert [m.model_dump() for m in record.prompt] == list(tasks[record.id].messages)


def test_collect_labeler_noise_is_the_simulated_labelers_noise(tmp_path, smoke_base, smoke_collect):
    _collect(tmp_path, smoke_base, "collect.labeler_noise=0")
    records = read_comparisons(tmp_path / "collect" / "comparisons.jsonl")
    tasks = {t.id: t for t in load_tasks(tmp_path / "world" / "prompts" / "rm.jsonl")}
    noisy = read_comparisons(smoke_collect / "collect" / "comparisons.jsonl")  # at the default 0.3
    assert [r.responses for r in records] == [r.responses for r in noisy]  # the same samples, ranked without noise
    assert all(SimulatedLabeler(r.labeler_id, noise=0).rank(tasks[r.id], r.responses) == r.ranks for r in records)
    assert any(r.ranks != n.ranks for r, n in zip(records, noisy))


def test_a_killed_collection_resumes_to_the_same_records(tmp_path, smoke_collect):
    straight, killed = smoke_collect, tmp_path / "killed"
    for folder in ("world", "pretrain", "collect"):  # a copy of the finished run (its policy in it): a moved run is the same run
        shutil.copytree(straight / folder, killed / folder)
    # make `killed` look like a run that died inside its third chunk (smoke collect.batch_size = 16)
    out = killed / "collect" / "comparisons.jsonl"
    lines = out.read_text().splitlines()
    (killed / "collect" / "comparisons.partial.jsonl").write_text("\n".join(lines[:40]) + "\n" + lines[40][:30])
    out.unlink()
    (killed / "collect" / "done.json").unlink()
    proc = _collect(killed, killed)
    assert "resuming after 32 of 171 prompts" in " ".join(proc.stderr.split())
    assert out.read_text() == (straight / "collect" / "comparisons.jsonl").read_text()
    # the killed run had logged its one metrics line (it died after, here): the resumed run's replaces it
    assert (killed / "collect" / "metrics.jsonl").read_text() == (straight / "collect" / "metrics.jsonl").read_text()


def test_a_collection_stopped_after_its_last_chunk_is_not_sampled_again(tmp_path, smoke_base, monkeypatch):
    import pytest

    from instructrl.config import load_config
    from instructrl.rundir.run import RunDir
    from instructrl.stages.collect import run_collect

    config = load_config(SMOKE, [f"run.dir={tmp_path}", f"collect.policy={smoke_base / 'pretrain' / 'final'}"])

    def interrupt(self, step, metrics):
        raise KeyboardInterrupt  # Ctrl-C once every record is written, as the stage wraps up

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "log", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_collect(config.model_copy(deep=True))
    said = []
    run_collect(config.model_copy(deep=True), log=said.append)
    assert "collect: resuming after 160 of 171 prompts" in said  # only the last, short chunk again (smoke collect.batch_size = 16)
    assert len(read_comparisons(tmp_path / "collect" / "comparisons.jsonl")) == 171


def test_people_judgements_are_checked_and_used(tmp_path, smoke_collect):
    people = tmp_path / "people.jsonl"
    lines = (smoke_collect / "collect" / "comparisons.jsonl").read_text().splitlines()[:3]
    people.write_text("\n".join(lines) + "\n")
    cli("collect", "-c", str(SMOKE), f"run.dir={tmp_path / 'ok'}", f"collect.judgements={people}")
    assert (tmp_path / "ok" / "collect" / "comparisons.jsonl").read_text().splitlines() == lines

    broken = json.loads(lines[1]) | {"ranks": [0]}
    people.write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    proc = cli("collect", "-c", str(SMOKE), f"run.dir={tmp_path / 'bad'}", f"collect.judgements={people}", check=False)
    assert proc.returncode == 2 and f"{people}:2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "collect").exists()

    # a record twice (a file joined to itself), or an id naming two prompts: the RM would weigh it twice, or
    # its diagnostics judge the answers to one prompt as answers to another
    other_prompt = json.loads(lines[1]) | {"id": json.loads(lines[0])["id"]}
    for written, message in (([lines[0], lines[1], lines[0]], f"{people}:3: repeats the record at {people}:1 (labeler "),
                             ([lines[0], json.dumps(other_prompt)], f"{people}:2: prompt id '{other_prompt['id']}' names another prompt at {people}:1")):
        people.write_text("\n".join(written) + "\n")
        proc = cli("collect", "-c", str(SMOKE), f"run.dir={tmp_path / 'bad'}", f"collect.judgements={people}", check=False)
        assert proc.returncode == 2 and f"error: {message}" in " ".join(proc.stderr.split()), proc.stderr
        assert not (tmp_path / "bad" / "collect").exists()
    # K may differ from record to record (InstructGPT ranked 4 to 9), and ties are a labeler's to give
    short = json.loads(lines[2])
    short = short | {key: short[key][:3] for key in ("responses", "ranks", "likert", "flags")} | {"ranks": [0, 0, 1]}
    people.write_text("\n".join([lines[0], lines[1], json.dumps(short)]) + "\n")
    cli("collect", "-c", str(SMOKE), f"run.dir={tmp_path / 'mixed'}", f"collect.judgements={people}")


def test_a_checkpoints_generation_settings_do_not_reach_collect_or_eval_answers(smoke_base):
    """generate fills every setting it is not given from the checkpoint's generation_config.json
    (Qwen2.5-Instruct's sets repetition_penalty): collect's and eval's answers must come from the
    model's own distribution all the same, and the model's settings be left as they were."""
    import torch

    from instructrl.evaluation.generate import generate_answers
    from instructrl.models.base import load_causal_lm, load_tokenizer

    model = load_causal_lm(smoke_base / "pretrain" / "final", dropout=0.0).eval()
    tokenizer = load_tokenizer(smoke_base / "pretrain" / "final")
    prompts = [[{"role": "user", "content": t.messages[0]["content"]}] for t in load_tasks(smoke_base / "world" / "prompts" / "eval.jsonl")[:6]]
    greedy = generate_answers(model, tokenizer, prompts, max_new_tokens=8)
    torch.manual_seed(0)
    sampled = generate_answers(model, tokenizer, prompts, max_new_tokens=8, num_samples=2, temperature=1.0)
    settings = {"no_repeat_ngram_size": 1, "min_new_tokens": 8, "suppress_tokens": list(range(3, 300)), "repetition_penalty": 5.0}
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    before = model.generation_config.to_dict()
    with torch.no_grad():  # the settings do change what generate writes when they are let in
        ids = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        let_in = tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:])
    assert let_in.strip() != greedy[0]
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=8) == greedy
    torch.manual_seed(0)
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=8, num_samples=2, temperature=1.0) == sampled
    assert model.generation_config.to_dict() == before
