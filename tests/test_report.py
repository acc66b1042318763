"""The evaluation's numbers and the report a reader sees: per-family win rates, the same figures in
results.json, the printed headline and the page, answers shown as text, and a page that works
offline and at a phone's width."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from instructrl.config import WorldConfig
from instructrl.evaluation.evaluate import judge_answers
from instructrl.evaluation.report import GOLD_ANSWERS, SAMPLES_SHOWN, _win_text, headline, write_report
from instructrl.world.build import make_splits
from instructrl.world.labeler import SimulatedLabeler

HOSTILE = "<script>alert(1)</script> & <b>bold</b>"  # what a model may well write


def _tasks(n: int = 40):
    return make_splits(WorldConfig(n_prompts=400, n_val=16, n_eval=n))["eval"]


def test_win_rate_per_family_with_its_interval():
    tasks = _tasks()
    sft = [[t.answer] for t in tasks]
    other = [[t.answer if t.family != tasks[0].family else "wrong"] for t in tasks]  # loses on one family, ties elsewhere
    _, results = judge_answers(tasks, {"sft": sft, "other": other}, SimulatedLabeler())
    families = results["other"]["families"]
    assert set(families) == {t.family for t in tasks}
    for family, r in families.items():
        w = r["win_rate_vs_sft"]
        assert w["n"] == r["n"] == sum(t.family == family for t in tasks)
        if family == tasks[0].family:
            assert w["win_rate"] == 0.0 and w["losses"] == w["n"]
        else:
            assert w["win_rate"] == 0.5 and w["ties"] == w["n"]
        assert w["ci95"][1] - w["ci95"][0] > 0.05  # a handful of prompts is no point estimate
    assert "win_rate_vs_sft" not in results["sft"]["families"][tasks[0].family]  # SFT is not compared with itself


def _run_folder(root: Path) -> dict:
    """A run folder as eval, rm and ppo leave it, small, with a model whose answers hold HTML."""
    tasks = _tasks(24)
    answers = {"demonstrations": [[t.answer] for t in tasks], "base": [[HOSTILE] for _ in tasks],
               "sft": [[t.answer if i % 3 else "no"] for i, t in enumerate(tasks)], "ppo": [[t.answer] for t in tasks],
               GOLD_ANSWERS: [[t.answer] for t in tasks]}
    judged, results = judge_answers(tasks, answers, SimulatedLabeler())
    for name, loss in (("base", 1.2), ("sft", 6.0), ("ppo", 2.5)):
        results[name]["pretraining_loss"] = loss
        results[name]["alignment_tax"] = loss - 6.0
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "results.json").write_text(json.dumps({"models": {}, "n_prompts": len(tasks), "results": results}))
    messages = [[{"role": "user", "content": f"Say {HOSTILE}"}]] + [list(t.messages) for t in tasks[1:]]
    (root / "eval" / "samples.jsonl").write_text("".join(json.dumps(
        {"id": t.id, "family": t.family, "messages": messages[i], "gold": t.answer if i else HOSTILE,
         **{name: {"answer": answers[name][i][0], "likert": judged[name][i][0].likert} for name in answers if name != GOLD_ANSWERS}}) + "\n"
        for i, t in enumerate(tasks)))
    (root / "rm").mkdir()
    (root / "rm" / "diagnostics.json").write_text(json.dumps({
        "against": "the gold labeler", "correlation_with": "Likert", "accuracy": 0.7, "pairs": 30,
        "accuracy_by_gold_margin": {"0-0.1": 0.5, "0.1-0.3": None, "0.3-2": 0.8}, "pairs_by_gold_margin": {"0-0.1": 10, "0.1-0.3": 0, "0.3-2": 20},
        "gold_correlation": 0.4, "length_bias": -0.1, "accuracy_correct_vs_incorrect": 0.6,
        "accuracy_by_family": {"add_numbers": 0.55}, "pairs_by_family": {"add_numbers": 30},
        "accuracy_by_pair_kind": {"exact>wrong": {"accuracy": 0.7, "pairs": 30}}}))
    (root / "ppo").mkdir()
    (root / "ppo" / "metrics.jsonl").write_text("".join(json.dumps({
        "episodes": 16 * (i + 1), "rollout/score": 0.1 * i, "rollout/sqrt_kl": 0.2 * i, "rollout/gold_likert": 5 - 0.1 * i,
        "rollout/kl": 0.04 * i * i, "rollout/entropy": 0.6, "rollout/length": 5.0, "rollout/eos_rate": 1.0 - 0.01 * i}) + "\n" for i in range(6)))
    return results


def test_report_shows_answers_as_text_offline_with_the_same_figures(tmp_path):
    results = _run_folder(tmp_path)
    page = write_report(tmp_path).read_text()
    # a model's answer, a prompt and a gold answer holding HTML are shown as text, never run or rendered
    assert "<script>alert" not in page and "<b>bold</b>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;") >= 3
    # offline: nothing fetched from elsewhere; every image is embedded
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert all(base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG" for src in images)
    # the figures printed at the end of the pipeline are the report's, and every family's win rate is shown
    for name, r in results.items():
        if "win_rate_vs_sft" in r:
            assert _win_text(r["win_rate_vs_sft"]) in page
            for family in r["families"].values():
                assert _win_text(family["win_rate_vs_sft"]) in page
    printed = "\n".join(headline(results))
    for figure in re.findall(r"\d+\.\d+%? \[[^\]]+\]|Likert \d\.\d\d", printed):
        assert figure.removeprefix("Likert ") in page, figure
    # the reader is told what the numbers mean
    for words in ("(a tie) counts half", "95% interval", "ceiling", "alignment tax", "minus SFT", "Likert score (1-7)", "pairs"):
        assert words in page, words
    assert "new:" not in page and "<caption>" not in page  # eval told no prompts apart: nothing about new ones
    rows, _ = _side_by_side(page)
    assert rows[0] == ["prompt", "gold answer", "base", "sft", "ppo"] and len(rows) == 1 + SAMPLES_SHOWN
    assert rows[1][1:3] == [HOSTILE, f"{HOSTILE} (Likert 1)"]
    # PPO's alignment tax is its loss over SFT's; the base model, before SFT, pays none
    assert "ppo: Likert" in printed and "alignment tax -3.500 nats (held-out pretraining loss 2.500" in printed
    assert "base: Likert" in printed and "-4.800" not in printed and "held-out pretraining loss 1.200 nats" in printed
    assert "-3.500" in page and "-4.800" not in page  # the report's table, too


class _Tables(HTMLParser):
    """The page's tables as a browser reads them: per table its rows, per row its cells' text, and the tags met in cells."""

    def __init__(self):
        super().__init__()
        self.tables, self.tags_in_cells, self.cell = [], set(), None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif self.cell is not None:
            self.tags_in_cells.add(tag)
            self.cell += "\n" if tag == "br" else ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def _side_by_side(page: str) -> tuple[list[list[str]], set[str]]:
    """The rows of the report's "Answers side by side" table, header first, and every tag its cells hold."""
    parser = _Tables()
    parser.feed(page[page.index("<h2>Answers side by side</h2>"):])
    return parser.tables[0], parser.tags_in_cells


def test_the_report_shows_the_answers_to_your_own_prompts_side_by_side_as_text(tmp_path):
    """eval.prompts: no gold labeler, so only the reward model's figures; every model's greedy answer to the first prompts,
    side by side with its reward, as text: a | , markup or a line break in a prompt or an answer breaks no table."""
    hostile = "a | b\n<script>alert(1)</script></td></tr><tr><td>x"
    names = ("base", "sft", "ppo")
    n = SAMPLES_SHOWN + 3
    results = {name: {"reward": {"mean": 0.5, **({"win_rate_vs_sft": {"win_rate": 0.5, "ci95": [0.2, 0.8], "n": n}} if name != "sft" else {})}}
               for name in names}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(
        {"models": {}, "prompts": "mine.jsonl", "reward_model": "rm", "n_prompts": n, "results": results}))
    (tmp_path / "eval" / "samples.jsonl").write_text("".join(json.dumps(
        {"id": f"mine.jsonl:{i + 1}", "messages": [{"role": "user", "content": f"prompt {i}: {hostile}"}],
         **{name: {"answer": "" if name == "ppo" else f"{name} says {i}: {hostile}", "reward": k + i / 100, "sampled": ["s"]}
            for k, name in enumerate(names)}}) + "\n" for i in range(n)))
    page = write_report(tmp_path).read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"the first {SAMPLES_SHOWN} of the {n} prompts of <code>mine.jsonl</code>; in brackets, the reward model's reward" in page
    rows, tags = _side_by_side(page)
    assert tags <= {"b", "br", "i"}  # the page's own emphasis and line breaks; nothing a prompt or an answer wrote
    assert rows[0] == ["prompt", *names] and len(rows) == 1 + SAMPLES_SHOWN
    for i, row in enumerate(rows[1:]):
        assert row == [f"user: prompt {i}: a | b\n<script>alert(1)</script></td></tr><tr><td>x",
                       f"base says {i}: a | b\n<script>alert(1)</script></td></tr><tr><td>x (reward {i / 100:.2f})",
                       f"sft says {i}: a | b\n<script>alert(1)</script></td></tr><tr><td>x (reward {1 + i / 100:.2f})",
                       f"(empty) (reward {2 + i / 100:.2f})"]


@pytest.mark.skipif(shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(), reason="Debian's chromium is missing")
def test_report_reads_at_a_phone_width(tmp_path):
    from playwright.sync_api import sync_playwright

    _run_folder(tmp_path)
    report = write_report(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 400, "height": 800})
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(report.as_uri())
        # the page itself never scrolls sideways (wide tables scroll inside their box) and no script ran
        assert page.evaluate("document.documentElement.scrollWidth") <= 400
        assert dialogs == []
        assert all(page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth > 0 && i.getBoundingClientRect().right <= 400)"))
        page.screenshot(path=tmp_path / "narrow.png", full_page=True)
        browser.close()


def test_eval_of_a_users_model_with_another_tokenizer_and_no_chat_template(tmp_path, smoke_base):
    from conftest import SMOKE, cli
    from tiny_models import save_tiny_model

    mine = save_tiny_model("gpt2", tmp_path / "gpt2")  # its own BPE, no chat template
    proc = cli("eval", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", "eval.n_prompts=4",
               f"eval.models={{sft: {smoke_base / 'pretrain' / 'final'}, mine: {mine}}}")
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["results"]
    # a loss per token of another tokenizer is no tax next to SFT's: measured, but not compared
    assert "pretraining_loss" in results["mine"] and "alignment_tax" not in results["mine"]
    assert "mine tokenize(s) text differently from sft" in proc.stderr
    assert results["mine"]["win_rate_vs_sft"]["n"] == 4 and "<th>mine</th>" in (tmp_path / "run" / "report.html").read_text()


def test_the_printed_table_keeps_every_name_whole_in_80_columns():
    from rich.console import Console

    from instructrl.evaluation.evaluate import results_table

    tasks = _tasks()
    names = ("demonstrations", "base", "sft", "ppo", "ppo_ptx", GOLD_ANSWERS)  # a pipeline's six columns
    _, results = judge_answers(tasks, {n: [[t.answer if i % 2 else "no"] for i, t in enumerate(tasks)] for n in names}, SimulatedLabeler())
    console = Console(width=80, record=True)
    console.print(results_table(results))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    for name in [*names, *results["sft"]["families"], "fails_to_follow"]:
        assert re.search(rf"(^|\s){name}(\s|$)", text, re.M), name  # not cut to "demonstr…" or folded


def test_over_optimisation_plot_of_ppo_on_prompts_without_gold_says_so_and_warns_of_nothing():
    import warnings

    from instructrl.evaluation.report import _overoptimisation_plot

    rows = [{"rollout/sqrt_kl": 0.1 * i, "rollout/score": 0.5 * i, "episodes": 16 * i} for i in range(1, 4)]  # no rollout/gold_likert
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of a legend with nothing in it
        fig = _overoptimisation_plot({"ppo": rows})
    proxy, gold = fig.axes
    assert proxy.get_legend() is not None and gold.get_legend() is None
    assert [t.get_text() for t in gold.texts] == ["no gold scores: these prompts have no gold answers"]


def test_the_rounds_of_a_ppo_run_join_end_to_end(tmp_path):
    """Round 2 counts on from round 1 (ppo.first_iteration); a round written before that counted from 0 again."""
    from instructrl.evaluation.report import _ppo_metrics

    def write(folder, episodes):
        (folder / "ppo").mkdir(parents=True)
        (folder / "ppo" / "metrics.jsonl").write_text("".join(json.dumps({"step": e // 16, "episodes": e}) + "\n" for e in episodes))

    write(tmp_path / "new", [16, 32])
    write(tmp_path / "new" / "round2", [48, 64])
    write(tmp_path / "new" / "round3", [80, 96])  # left by an earlier run of three rounds
    write(tmp_path / "old", [16, 32])
    write(tmp_path / "old" / "round2", [16, 32])
    for run in ("new", "old"):
        assert [r["episodes"] for r in _ppo_metrics(tmp_path / run, rounds=2)["ppo"]] == [16, 32, 48, 64], run


def test_the_report_of_rounds_shows_the_last_rounds_reward_model(tmp_path):
    _run_folder(tmp_path)  # round 1's RM: accuracy 0.7
    for r, accuracy in ((2, 0.9), (3, 0.1)):  # round 3 is left from an earlier run of three rounds
        (tmp_path / f"round{r}" / "rm").mkdir(parents=True)
        diagnostics = json.loads((tmp_path / "rm" / "diagnostics.json").read_text()) | {"accuracy": accuracy, "pairs": 40}
        (tmp_path / f"round{r}" / "rm" / "diagnostics.json").write_text(json.dumps(diagnostics))
    page = write_report(tmp_path, rounds=2).read_text()
    assert "round 1 0.70 (30 pairs), round 2 0.90 (40 pairs). Below, round 2's" in page
    assert "<td>0.900 (40 pairs)</td>" in page and "0.100" not in page and "0.700 (30 pairs)" not in page


def test_an_eval_that_fails_leaves_the_last_results(tmp_path, smoke_base):
    """A model whose weights are cut short fails the new evaluation: the last one's results stay."""
    from conftest import SMOKE, cli

    base = smoke_base / "pretrain" / "final"
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    args = ("eval", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", "eval.n_prompts=4")
    cli(*args, f"eval.models={{base: {base}}}")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "eval").iterdir() if p.is_file()}
    proc = cli(*args, f"eval.models={{base: {base}, broken: {broken}}}", check=False)
    assert proc.returncode == 2 and f"eval.models.broken: cannot load model '{broken}'" in proc.stderr  # the key that chose it
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "eval").iterdir() if p.is_file()} == before


def test_eval_leaves_out_a_model_trained_on_inputs_that_changed_since(tmp_path, smoke_base):
    """A PPO run left over from before its SFT model was trained again is not evaluated as this run's."""
    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import default_models
    from instructrl.rundir.run import RunDir

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_base / "pretrain", run_dir / "pretrain")
    for stage in ("sft", "ppo"):
        shutil.copytree(smoke_base / "pretrain" / "final", run_dir / stage / "final")
    config = load_config(overrides=[f"run.dir={run_dir}"])
    RunDir(config, "ppo", ("run",)).write_lineage({"policy": run_dir / "sft" / "final"})
    logged = []
    assert set(default_models(config, logged.append)) == {"base", "sft", "ppo"} and not logged
    (run_dir / "sft" / "final" / "config.json").write_text("{}")  # SFT trained again: the PPO run began from another model
    assert set(default_models(config, logged.append)) == {"base", "sft"}
    assert "ppo" in logged[0] and "left out" in logged[0] and "policy" in logged[0]
    (run_dir / "ppo_ptx" / "checkpoints").mkdir(parents=True)  # begun, not finished (still running, or stopped)
    logged.clear()
    assert set(default_models(config, logged.append)) == {"base", "sft"}
    assert any(line.startswith("eval: ppo_ptx (") and "has not finished" in line for line in logged)


def test_eval_leaves_out_a_model_trained_from_a_stage_since_discarded(tmp_path, smoke_base):
    """`instructrl sft --restart` (or pipeline --restart-from sft) discards sft/ before it trains SFT again: until
    it has, the PPO runs trained from the old SFT model are no longer this run's. A world file (any stage rebuilds
    it as it was) or a data file of the user's, gone, leaves a model in."""
    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import default_models
    from instructrl.rundir.run import RunDir

    run_dir, own = tmp_path / "run", tmp_path / "prompts.jsonl"
    shutil.copytree(smoke_base / "pretrain", run_dir / "pretrain")  # its lineage names world/corpus.txt, not copied
    for stage in ("sft", "ppo"):
        shutil.copytree(smoke_base / "pretrain" / "final", run_dir / stage / "final")
    shutil.copytree(smoke_base / "world", run_dir / "world")
    own.write_text('{"prompt": "Add 2 and 3."}\n')
    config = load_config(overrides=[f"run.dir={run_dir}"])
    sft = run_dir / "sft" / "final"
    RunDir(config, "ppo", ("run",)).write_lineage({"policy": sft, "reference": sft, "prompts": own, "world": run_dir / "world" / "prompts" / "ppo.jsonl"})
    own.unlink()
    shutil.rmtree(run_dir / "world")
    logged = []
    assert set(default_models(config, logged.append)) == {"base", "sft", "ppo"} and not logged
    shutil.rmtree(sft)  # as --restart leaves sft/ until SFT has finished again
    assert set(default_models(config, logged.append)) == {"base"}
    assert logged[-1] == (f"eval: ppo ({run_dir / 'ppo'}) left out: it was trained from inputs that no longer exist: policy and reference "
                          f"({sft}; `instructrl pipeline --restart-from sft` trains it and the stages after it again)")
    # a stage run again keeps its say: finished on inputs that have not changed (it cannot train again without them)
    assert RunDir(config, "ppo", ("run",)).changed_inputs() == []


def test_eval_leaves_out_a_later_rounds_model_trained_from_a_stage_since_discarded(tmp_path, smoke_base):
    """A later round's lineage (round2/) records the run's own folders as named from it, round2/../sft/final as ../sft/final
    (by absolute path before): its PPO, trained with SFT as the KL reference, was kept after `instructrl sft --restart` discarded SFT."""
    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import default_models
    from instructrl.rundir.run import RunDir

    run_dir = tmp_path / "run"
    for stage in ("pretrain", "sft", "ppo", "round2/rm", "round2/ppo"):
        shutil.copytree(smoke_base / "pretrain" / "final", run_dir / stage / "final")
    config = load_config(overrides=[f"run.dir={run_dir}", "pipeline.rounds=2"])
    in_round = config.model_copy(deep=True)
    in_round.run.dir = run_dir / "round2"
    RunDir(in_round, "ppo", ("run",)).write_lineage({"policy": in_round.run.dir / ".." / "ppo" / "final", "reference": in_round.run.dir / ".." / "sft" / "final",
                                                      "reward_model": in_round.run.dir / "rm" / "final"})
    logged = []
    assert set(default_models(config, logged.append)) == {"base", "sft", "ppo"} and not logged
    shutil.rmtree(run_dir / "round2" / "rm" / "final")  # the round's own folder, recorded inside it
    shutil.rmtree(run_dir / "sft" / "final")
    assert set(default_models(config, logged.append)) == {"base"}
    assert logged[-1] == (f"eval: ppo ({run_dir / 'round2' / 'ppo'}) left out: it was trained from inputs that no longer exist: "
                          f"reference ({run_dir / 'sft' / 'final'}; `instructrl pipeline --restart-from sft` trains it and the stages after it again), "
                          f"reward_model ({run_dir / 'round2' / 'rm' / 'final'}; `instructrl pipeline --restart-from rm` trains it and the stages after it again)")


def test_eval_of_your_own_prompts_judged_by_a_reward_model(tmp_path, smoke_rm):
    """eval.prompts: any prompt records, answered by each model and scored by eval.reward_model, which
    re-reads each answer with its own tokenizer (the gpt2 model's differs from the RM's)."""
    from conftest import SMOKE, cli
    from tiny_models import save_tiny_model

    from instructrl.data.chat import tokenize_conversation
    from instructrl.models.base import load_tokenizer
    from instructrl.models.reward import RewardModel, score_sequences

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse the word cat."}\n{"messages": [{"role": "user", "content": "Add 2 and 3."}]}\n'
                       '{"id": "p3", "prompt": [{"role": "user", "content": "Sort 3 1 2."}]}\n')
    rm, run = smoke_rm / "rm" / "final", tmp_path / "run"
    models = f"eval.models={{sft: {smoke_rm / 'pretrain' / 'final'}, mine: {save_tiny_model('gpt2', tmp_path / 'gpt2')}}}"
    refused = cli("eval", "-c", str(SMOKE), f"run.dir={run}", models, f"eval.prompts={prompts}", check=False)
    assert refused.returncode == 2 and "eval.prompts: your own prompts need eval.reward_model" in refused.stderr and not run.exists()
    proc = cli("eval", "-c", str(SMOKE), f"run.dir={run}", models, f"eval.prompts={prompts}", f"eval.reward_model={rm}")
    assert "RM wins" in proc.stdout
    evaluation = json.loads((run / "eval" / "results.json").read_text())
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["prompts.jsonl:1", "prompts.jsonl:2", "p3"] and evaluation["reward_model"] == str(rm)
    model, tokenizer = RewardModel.from_pretrained(rm), load_tokenizer(rm)
    for name in ("sft", "mine"):
        sequences = [tokenize_conversation(tokenizer, s["messages"] + [{"role": "assistant", "content": s[name]["answer"]}]).input_ids
                     for s in samples]
        expected = score_sequences(model, sequences, tokenizer.pad_token_id, "cpu")
        assert [s[name]["reward"] for s in samples] == pytest.approx(expected, abs=1e-5)
        assert evaluation["results"][name]["reward"]["mean"] == pytest.approx(sum(expected) / 3, abs=1e-5)
        sampled = [r for s in samples for r in s[name]["sampled_rewards"]]
        assert len(sampled) == 3 * 4 and evaluation["results"][name]["sampled"]["reward"]["mean"] == pytest.approx(sum(sampled) / 12)
        assert not {"overall", "new_prompts"} & set(evaluation["results"][name])  # no gold labeler, nor training prompts, for prompts not the world's
    win = evaluation["results"]["mine"]["reward"]["win_rate_vs_sft"]
    assert win["n"] == 3 and win["wins"] == sum(s["mine"]["reward"] > s["sft"]["reward"] for s in samples)
    page = (run / "report.html").read_text()
    assert "Judged by the reward model" in page and f"Each model's greedy answer to all 3 prompts of <code>{prompts}</code>" in page
    assert all(f"(reward {s[name]['reward']:.2f})" in page for s in samples for name in ("sft", "mine"))  # side by side, from samples.jsonl


def test_eval_of_the_worlds_prompts_by_the_gold_labeler_and_a_reward_model(tmp_path, smoke_rm):
    from conftest import SMOKE, cli

    base = smoke_rm / "pretrain" / "final"
    cli("eval", "-c", str(SMOKE), f"run.dir={tmp_path}", "eval.n_prompts=6", f"eval.models={{sft: {base}, again: {base}}}",
        f"eval.reward_model={smoke_rm / 'rm' / 'final'}")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    # the same model's greedy answers tie everywhere, by either judge; the gold and demonstrated answers are scored too
    assert results["again"]["reward"]["win_rate_vs_sft"]["ties"] == 6 == results["again"]["win_rate_vs_sft"]["ties"]
    assert {"reward", "overall"} <= set(results[GOLD_ANSWERS]) and "reward" in results["demonstrations"]["sampled"]
    page = (tmp_path / "report.html").read_text()
    assert "Held-out prompts, judged by the gold labeler" in page and "Judged by the reward model" in page


def test_eval_samples_follow_the_seed_alone(tmp_path, smoke_base):
    """Same seed, same sampled answers, whichever models answer beside; another seed, other answers, and
    each run's record says which seed it drew them with."""
    from conftest import SMOKE

    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import run_eval

    base = smoke_base / "pretrain" / "final"

    def sampled(name: str, seed: int, models: str) -> tuple[list, int]:
        run_dir = tmp_path / name
        run_eval(load_config(SMOKE, [f"run.dir={run_dir}", f"run.seed={seed}", "eval.n_prompts=4", f"eval.models={models}"]), log=lambda _: None)
        rows = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
        return [row["sft"]["sampled"] for row in rows], json.loads((run_dir / "eval" / "run.json").read_text())["seed"]

    alone = sampled("a", 0, f"{{sft: {base}}}")
    assert sampled("b", 0, f"{{other: {base}, sft: {base}}}") == alone  # another model sampling first draws nothing from sft's
    other_seed = sampled("c", 1, f"{{sft: {base}}}")
    assert other_seed[0] != alone[0] and (alone[1], other_seed[1]) == (0, 1)


def test_an_eval_prompt_is_seen_when_a_training_prompt_asks_its_question_in_any_words(tmp_path):
    from instructrl.data.jsonl import write_jsonl
    from instructrl.evaluation.evaluate import seen_in_training
    from instructrl.world.build import WorldFiles
    from instructrl.world.tasks import Task

    def task(text: str, family: str, args: dict) -> Task:
        return Task(text, family, ({"role": "user", "content": text},), "", args)

    world = WorldFiles(tmp_path)
    write_jsonl(world.prompts("sft"), [task("Reverse 'cat'.", "reverse_word", {"word": "cat"}).to_record()])
    write_jsonl(world.prompts("rm"), [task("Add 2 and 3.", "add_numbers", {"a": 2, "b": 3}).to_record()])
    write_jsonl(world.prompts("ppo"), [])
    write_jsonl(world.prompts("val"), [task("Reverse 'dog'.", "reverse_word", {"word": "dog"}).to_record()])  # not a training split
    held_out = [task("Spell cat backwards.", "reverse_word", {"word": "cat"}),  # sft's question, other words
                task("What is 2 plus 3?", "add_numbers", {"b": 3, "a": 2}),  # rm's, its input written in another order
                task("Spell dog backwards.", "reverse_word", {"word": "dog"}),  # asked by a validation prompt alone
                task("Uppercase cat.", "uppercase", {"word": "cat"})]  # the same input, another family's question
    assert seen_in_training(world, held_out) == [True, True, False, False]


def test_when_every_eval_prompt_was_seen_in_training_no_figures_without_them_are_made_up(tmp_path):
    from instructrl.evaluation.evaluate import new_prompt_results

    tasks = _tasks(8)
    judged, results = judge_answers(tasks, {"sft": [[t.answer] for t in tasks], "ppo": [["no"] for _ in tasks]}, SimulatedLabeler())
    one_new = new_prompt_results(tasks, judged, [True] * 7 + [False])
    assert one_new["ppo"]["win_rate_vs_sft"]["n"] == 1 and (one_new["ppo"]["prompts"], one_new["ppo"]["seen"]) == (1, 7)
    for name, r in new_prompt_results(tasks, judged, [True] * 8).items():
        results[name]["new_prompts"] = r
    assert results["ppo"]["new_prompts"] == {"prompts": 0, "seen": 8}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"models": {}, "n_prompts": 8, "results": results}))
    page = write_report(tmp_path).read_text()
    assert "each of the 8 prompts asks a question a training prompt asks, in other words: none is new" in page
    assert _model_tables(page)[0][0] == ["model", "mean Likert (1-7)", "win rate vs SFT, ties half (95% interval)", "held-out pretraining loss (nats/token)",
                                         "loss − SFT's: the alignment tax", "flags (share of answers)"]  # no columns of figures on no prompts


def _model_tables(page: str) -> list[list[list[str]]]:
    """The report's tables of the models' figures on the held-out prompts, greedy then sampled: rows of cells' text, header first."""
    parser = _Tables()
    parser.feed(page)
    return [table for table in parser.tables if table[0][:2] in (["model", "mean Likert (1-7)"], ["model", "mean Likert (sampled)"])]


def test_eval_gives_the_figures_on_the_prompts_whose_question_no_training_prompt_asks(tmp_path, smoke_base):
    from conftest import SMOKE, cli

    from instructrl.evaluation.preference import interval95
    from instructrl.world.build import load_tasks

    base = smoke_base / "pretrain" / "final"
    proc = cli("eval", "-c", str(SMOKE), f"run.dir={tmp_path}", f"eval.models={{sft: {base}, again: {base}}}", "eval.samples=2")
    evaluation = json.loads((tmp_path / "eval" / "results.json").read_text())
    results = evaluation["results"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    # recomputed here: an eval prompt whose (family, args) a training prompt has too
    trained = {(t.family, json.dumps(t.args, sort_keys=True)) for split in ("sft", "rm", "ppo")
               for t in load_tasks(tmp_path / "world" / "prompts" / f"{split}.jsonl")}
    tasks = {t.id: t for t in load_tasks(tmp_path / "world" / "prompts" / "eval.jsonl")}
    seen = [(tasks[r["id"]].family, json.dumps(tasks[r["id"]].args, sort_keys=True)) in trained for r in rows]
    assert [r["seen_in_training"] for r in rows] == seen and 0 < sum(seen) < len(rows)  # the smoke world has both
    new = [r for r, s in zip(rows, seen) if not s]
    labeler = SimulatedLabeler()

    def outcome(a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    shown = {}  # per model the report's cells on the new prompts, greedy then sampled, from the figures recomputed here
    for name, r in results.items():
        figures = r["new_prompts"]
        assert (figures["prompts"], figures["seen"]) == (len(new), sum(seen))
        answers = [row[name]["answer"] if name != GOLD_ANSWERS else row["gold"] for row in new]
        likert = sum(labeler.judge(tasks[row["id"]], a).likert for row, a in zip(new, answers)) / len(new)
        assert figures["likert"] == pytest.approx(likert)
        shown[name] = [f"{likert:.2f}", ""]
        if name != "sft":
            outcomes = [outcome(labeler.judge(tasks[row["id"]], a).quality, labeler.judge(tasks[row["id"]], row["sft"]["answer"]).quality)
                        for row, a in zip(new, answers)]
            assert figures["win_rate_vs_sft"]["win_rate"] == pytest.approx(sum(outcomes) / len(new))
            assert figures["win_rate_vs_sft"]["ci95"] == pytest.approx(interval95(outcomes))
            shown[name][1] = f"{_win_text({'win_rate': sum(outcomes) / len(new), 'ci95': interval95(outcomes)})} (n={len(new)})"
        if name not in ("demonstrations", GOLD_ANSWERS):  # theirs is one written answer, met by every sample
            sampled = [labeler.judge(tasks[row["id"]], a).likert for row in new for a in row[name]["sampled"]]
            assert r["sampled"]["new_prompts"]["likert"] == pytest.approx(sum(sampled) / len(sampled))
            shown[name].append(f"{sum(sampled) / len(sampled):.2f}")
    assert results[GOLD_ANSWERS]["new_prompts"]["win_rate_vs_sft"]["win_rate"] > 0.5  # the smoke model is no match for the gold answers
    caption = f"new: the {len(new)} of {len(rows)} prompts whose question no training prompt asks ({sum(seen)} ask one in other words)"
    assert caption in " ".join(proc.stdout.split())  # however it wraps
    assert " ".join(proc.stdout.split()).count("new: Likert") == 2  # greedy and sampled
    # the report gives the same figures as columns of its model tables, greedy and sampled, under the same caption
    page = (tmp_path / "report.html").read_text()
    assert page.count(f"<caption>{caption}") == 2
    greedy, sampled = _model_tables(page)
    for table in (greedy, sampled):
        assert table[0][3:5] == ["new: mean Likert", "new: win rate vs SFT"]
        assert [row[0] for row in table[1:]] == list(results)
    assert {row[0]: row[3:5] for row in greedy[1:]} == {name: cells[:2] for name, cells in shown.items()}
    for row in sampled[1:]:
        if row[0] not in ("demonstrations", GOLD_ANSWERS):
            assert row[3] == shown[row[0]][2], row[0]
        w = results[row[0]]["sampled"]["new_prompts"].get("win_rate_vs_sft")
        assert row[4] == (f"{_win_text(w)} (n={len(new)} prompts)" if w else ""), row[0]
