"""The README's commands and config keys are the real ones: a key or sub-command renamed in the code
fails here rather than in a newcomer's first run."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from instructrl.cli import app
from instructrl.config import PipelineConfig
from instructrl.config.loading import _annotation

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FENCED = re.compile(r"```\w*\n(.*?)```", re.S)
# what the README shows as code, a line each: the fenced blocks' lines and the `inline spans`
CODE = [line.strip() for block in FENCED.findall(README) for line in block.splitlines()] + re.findall(r"`([^`\n]+)`", FENCED.sub("", README))
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "html", "md", "txt", "parquet"}


def test_every_config_key_the_readme_names_exists():
    sections = "|".join(PipelineConfig.model_fields)
    keys = {key for line in CODE for key in re.findall(rf"(?<![\w./-])((?:{sections})(?:\.[a-z_0-9]+)+)(?![\w/-])", line)
            if key.rpartition(".")[2] not in FILE_SUFFIXES}
    assert len(keys) > 40, "the pattern no longer finds the README's keys"
    assert [key for key in sorted(keys) if _annotation(key.split(".")) is None] == []


def test_every_instructrl_command_the_readme_shows_exists():
    commands = typer.main.get_command(app).commands
    shown = {tuple(line.split()[1:3]) for line in CODE if line.startswith("instructrl ") and not line.split()[1].startswith("-")}
    assert len(shown) > 15, "the pattern no longer finds the README's commands"
    for command, *rest in sorted(shown):
        assert command in commands, f"instructrl {command}"
        group = getattr(commands[command], "commands", None)  # data and label have sub-commands
        if group and rest and re.fullmatch(r"[a-z]+", rest[0]):
            assert rest[0] in group, f"instructrl {command} {rest[0]}"


PYTHON_SECTION = README.partition("## Using instructrl from Python")[2].partition("\n## ")[0]


def test_the_python_example_runs_on_a_smoke_run(smoke_rm, tmp_path, monkeypatch):
    """The README's Python example, run as written in a folder holding `runs/smoke` and `configs`."""
    (code,) = re.findall(r"```python\n(.*?)```", PYTHON_SECTION, re.S)
    run = tmp_path / "runs" / "smoke"
    (run / "ppo_ptx").mkdir(parents=True)
    for part in ("world", "collect", "rm"):
        (run / part).symlink_to(smoke_rm / part)
    (run / "ppo_ptx" / "final").symlink_to(smoke_rm / "pretrain" / "final")  # any causal LM of the run stands in for the policy
    (tmp_path / "configs").symlink_to(Path(__file__).resolve().parents[1] / "configs")
    monkeypatch.chdir(tmp_path)
    done: dict = {}
    exec(compile(code, "README.md", "exec"), done)
    assert not any(module.training for module in done["reward_model"].modules())
    assert len(done["rewards"]) == 2 and all(isinstance(r, float) for r in done["rewards"])
    assert 1 <= done["judgement"].likert <= 7 and done["records"]
    assert done["n_prompts"] == 2 and done["advantages"].shape == (1, 3)
    assert (done["config"].rm.lr, str(done["config"].run.dir)) == (3e-4, "runs/smoke")


def test_what_the_python_section_imports_has_a_docstring_of_its_own():
    """help() on what the README's Python section names says what it is: a class without a docstring
    of its own shows its base class's (a RewardModel would be "Base class for all neural network modules")."""
    import importlib

    imports = re.findall(r"^from (instructrl[\w.]*) import (.+)$", PYTHON_SECTION, re.M)
    named = [(module, name.strip()) for module, names in imports for name in names.split(",")]
    named += [(m.rpartition(".")[0], m.rpartition(".")[2]) for m in re.findall(r"`(instructrl\.[\w.]+\.run_\w+)", PYTHON_SECTION)]
    assert len(named) >= 8, "the patterns no longer find the section's names"
    objects = {f"{module}.{name}": getattr(importlib.import_module(module), name) for module, name in named}
    objects |= {"RewardModel.from_pretrained": objects["instructrl.models.reward.RewardModel"].from_pretrained,
                "SimulatedLabeler.judge": objects["instructrl.world.labeler.SimulatedLabeler"].judge}
    assert [name for name, obj in objects.items() if not (vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__)] == []



def test_what_help_instructrl_names_exists():
    import importlib

    import instructrl

    names = [n for n in re.findall(r"``([\w.]+)``", instructrl.__doc__) if n.partition(".")[0] in ("config", "models", "data", "world", "rlmath", "padding")]
    assert len(names) >= 6, "the pattern no longer finds the docstring's names"
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            importlib.import_module(f"instructrl.{name}")
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(f"instructrl.{module}"), attr), f"instructrl.{name}"


def test_runs_one_after_another_in_one_process_train_what_the_cli_trains(tmp_path, smoke_base):
    """The Python section's loop over seeds: a run after another in the same process (another seed, another
    precision) trains the checkpoint the CLI trains alone."""
    from conftest import SMOKE

    from instructrl.config import load_config
    from instructrl.stages.pretrain import run_pretrain

    finals = {}
    for seed, precision in ((1, "bf16"), (0, "no")):
        config = load_config(SMOKE, [f"run.dir={tmp_path / str(seed)}", f"run.seed={seed}", f"pretrain.mixed_precision={precision}"])
        finals[seed] = (run_pretrain(config, log=lambda line: None) / "model.safetensors").read_bytes()
    assert finals[0] == (smoke_base / "pretrain" / "final" / "model.safetensors").read_bytes()
    assert finals[1] != finals[0]
