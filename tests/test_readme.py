"""The README's commands and config keys are the real ones: a key or sub-command renamed in the code
fails here rather than in a newcomer's first run."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from instructrl.cli import app
from instructrl.config import PipelineConfig, _annotation

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
