"""Commands that look before a run: ``config`` prints the resolved config, ``data check`` validates a data file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from instructrl.cli.root import CONFIG_OPTION, OVERRIDES_ARGUMENT, app, load_options, log
from instructrl.config import dump_config
from instructrl.errors import UserError


@app.command("config")
def show_config(config: Optional[list[Path]] = CONFIG_OPTION, overrides: Optional[list[str]] = OVERRIDES_ARGUMENT) -> None:
    """Print the resolved config (defaults, file and overrides) as YAML."""
    typer.echo(dump_config(load_options(config, overrides)), nl=False)


data_app = typer.Typer(help="Check data files before a run.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="A JSONL, JSON, Parquet or CSV file, a datasets save_to_disk folder, or plain text (ppo.ptx_data)."),
    data_format: str = typer.Option("auto", "--format", help="auto (from the fields), text, prompt_completion, messages, preference, comparison, prompt, unpaired_preference or stepwise_supervision."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A checkpoint or tokenizer: also count the records whose text holds its control tokens (<|im_end|>, </s>, ...), which tokenizing reads as those tokens."),
) -> None:
    """Validate a data file and print its format, its record count and the stage inputs it can be.

    Every record is checked; the first that fits no format (or not the file's) is reported as
    file:line and the exit status is 2.
    """
    from instructrl.data.check import check_file
    from instructrl.data.formats import FORMATS
    from instructrl.data.inputs import warn_of_control_tokens
    from instructrl.data.readers import count_records
    from instructrl.training.progress import counting

    if data_format != "auto" and data_format not in FORMATS:
        raise UserError(f"data check: unknown --format {data_format!r}; choose auto or one of {', '.join(FORMATS)}")
    tokenizer = None
    if model is not None:
        from instructrl.models.base import load_tokenizer

        tokenizer = load_tokenizer(model)
    with counting("data check", count_records(file), "record") as done:
        summary = check_file(file, data_format, tokenizer, progress=done)
        done(summary["records"], total=summary["records"])
    details = ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("file", "format", "records", "usable_as", "not_usable_as", "control_tokens"))
    log(f"{file}: {summary['records']} {summary['format']} records" + (f" ({details})" if details else "")
         + f"; usable as {', '.join(summary['usable_as'])}")
    for stage, reason in summary.get("not_usable_as", {}).items():
        log(f"not usable as {stage}: {reason}")
    if "control_tokens" in summary:
        found = summary["control_tokens"]
        warn_of_control_tokens(file, (found["records"], found["first"]), "records", log)
        if not found["records"]:
            log(f"{file}: no record holds a control token of {model}'s tokenizer")
    typer.echo(json.dumps(summary))
