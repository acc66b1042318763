"""A rich progress bar with ETA and live metrics, shown by the main process only."""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

T = TypeVar("T")


class _Progress(Progress):
    """rich's bar on a terminal. Elsewhere (a log file, nohup, CI) rich draws the bar only once,
    when the work ends, so a plain line is printed every ``every_s`` seconds instead."""

    def __init__(self, *columns, every_s: float, **kwargs):
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._last_line = time.monotonic()

    def add_task(self, description: str, *args, completed: float = 0, unit: str = "step", **fields) -> TaskID:
        """``unit``: what one count is, for the pace ("step", "iter" for a PPO iteration, "prompt")."""
        # first: the count when added (a resumed run's finished steps), which the pace leaves out
        return super().add_task(description, *args, completed=completed, first=completed, unit=unit, **fields)

    def stop(self) -> None:
        if self.live.transient and not self.disable:
            self.live.stop()  # not rich's stop, which ends with a blank line off a terminal, where a cleared bar drew nothing
        else:
            super().stop()

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.disable or self.console.is_terminal or time.monotonic() - self._last_line < self.every_s:
            return
        self._last_line = time.monotonic()
        task = self._tasks[task_id]
        eta = time_remaining(task.total, task.completed, task.fields["first"], task.elapsed)
        rate = _pace(task)
        said = f" ({rate})" if rate else ""
        said += f", eta {eta:.0f} s" if eta is not None else ""
        of = f"/{task.total:.0f}" if task.total is not None else ""  # None: a count with no known end
        self.console.print(f"{task.description}: {task.completed:.0f}{of} after {task.elapsed or 0:.0f} s{said}  "
                           f"{task.fields.get('status', '')}".rstrip(), highlight=False, soft_wrap=True)


class _PaceColumn(ProgressColumn):
    def __init__(self):
        super().__init__(table_column=Column(no_wrap=True))  # on a narrow terminal the bar shrinks, not "12.5\nsteps/s"

    def render(self, task: Task) -> Text:
        return Text(_pace(task), style="progress.data.speed")


class _StatusColumn(TextColumn):
    """The live metrics, the column a narrow terminal shortens: one line, cut with "…"."""

    def render(self, task: Task) -> Text:
        text = super().render(task)
        text.no_wrap, text.overflow = True, "ellipsis"
        return text


def _pace(task: Task) -> str:
    """The mean pace since the task began, as ``pace`` words it."""
    return pace(task.completed - task.fields["first"], task.elapsed, task.fields["unit"])


def pace(done: float, elapsed: float | None, unit: str) -> str:
    """"12.5 steps/s", or "3.2 s/iter" when slower than one a second ("" before the first)."""
    if done <= 0 or not elapsed:
        return ""
    per_second = done / elapsed
    return f"{per_second:.1f} {unit}s/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit}"


def time_remaining(total: float | None, completed: float, first: float, elapsed: float | None) -> float | None:
    """Seconds left at the mean pace since the task began (from ``first`` done), or None when
    unknown. The mean, not rich's pace of the last seconds, which swings with a machine's load."""
    if total is None or not elapsed or completed <= first:
        return None
    return (total - completed) * elapsed / (completed - first)


def plural(n: int, noun: str) -> str:
    """``n`` and the noun, in the plural unless one: "1 step", "2 steps", "1 process", "4 processes"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def log_console() -> Console:
    """Standard error's console, for bars and messages: standard output holds a command's results alone (its
    table or JSON), as tqdm's bars keep off it, so `instructrl eval > results.txt` or `instructrl bench | jq`
    reads them whole."""
    return _fitted_console(stderr=True)


def results_console() -> Console:
    """Standard output's console, for a command's results."""
    return _fitted_console(stderr=False)


def _fitted_console(stderr: bool) -> Console:
    """Where the stream is no terminal (a log file, a pipe) no width needs fitting, so a bar or a results table
    is not cut to 80 columns ("1008/…", "0:00:…", a table's last models) unless COLUMNS says so. A notebook's
    output is no terminal either, but its cells are as wide as rich's Jupyter width: a wider bar wraps there."""
    console = Console(stderr=stderr)
    fitted = console.is_terminal or console.is_jupyter or "COLUMNS" in os.environ
    return console if fitted else Console(stderr=stderr, width=200)


def quiet_libraries() -> None:
    """Silence the libraries' own chatter (transformers' "Loading weights" and "Writing model shards" bars, accelerate's
    "Removed shared tensor" at every checkpoint): instructrl's bars and messages say what happens. The CLI calls it;
    a notebook or script may, as it changes those libraries' settings for the whole process."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()
    # transformers' deprecation of a method peft still calls: nothing a user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def progress_bar(enabled: bool = True, console: Console | None = None, every_s: float = 30.0, transient: bool = False) -> Progress:
    """On a narrow terminal the bar and the status's end ("kl 0.4…") give way; the counts and times stay whole.
    A ``transient`` bar is cleared when the work ends (or fails), leaving only what is printed after it."""
    return _Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), _PaceColumn(),
        TextColumn("eta"), TimeRemainingColumn(),
        _StatusColumn("{task.fields[status]}", table_column=Column()),  # Column(): may shrink (a TextColumn is no_wrap)
        disable=not enabled, transient=transient, console=console or log_console(), every_s=every_s,
    )


@contextmanager
def counting(description: str, total: int | None, unit: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A bar for a setup phase (reading, tokenizing, packing a user's file), cleared when it ends:
    minutes of it would otherwise pass in silence. Yields ``done(n, total=...)``, to be told the count
    so far (and the total, once known where it was not: None).
    ``enabled``: in the main process only, as every process reads the same file."""
    with progress_bar(enabled, transient=True) as bar:
        task = bar.add_task(description, total=total, unit=unit, status="")
        yield lambda n, total=total: bar.update(task, completed=n, total=total)


def tracked(items: Sequence[T], description: str, unit: str, enabled: bool = True) -> Iterator[T]:
    """Each of ``items``, counted by a ``counting`` bar."""
    with counting(description, len(items), unit, enabled) as done:
        for number, item in enumerate(items, start=1):
            yield item
            done(number)
