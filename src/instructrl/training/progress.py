"""A rich progress bar with ETA and live metrics, shown by the main process only."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Progress(Progress):
    """rich's bar on a terminal. Elsewhere (a log file, nohup, CI) rich draws the bar only once,
    when the work ends, so a plain line is printed every ``every_s`` seconds instead."""

    def __init__(self, *columns, every_s: float, **kwargs):
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._last_line = time.monotonic()
        self._first = {}  # task: its count when added (a resumed run's finished steps)

    def add_task(self, description: str, *args, completed: float = 0, **kwargs) -> TaskID:
        task_id = super().add_task(description, *args, completed=completed, **kwargs)
        self._first[task_id] = completed
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.disable or self.console.is_terminal or time.monotonic() - self._last_line < self.every_s:
            return
        self._last_line = time.monotonic()
        task = self._tasks[task_id]
        eta = time_remaining(task.total, task.completed, self._first.get(task_id, 0), task.elapsed)
        remaining = f", eta {eta:.0f} s" if eta is not None else ""
        self.console.print(f"{task.description}: {task.completed:.0f}/{task.total:.0f} after {task.elapsed or 0:.0f} s{remaining}  "
                           f"{task.fields.get('status', '')}".rstrip(), highlight=False, soft_wrap=True)


def time_remaining(total: float | None, completed: float, first: float, elapsed: float | None) -> float | None:
    """Seconds left at the mean pace since the task began (from ``first`` done), or None when
    unknown. The mean, not rich's pace of the last seconds, which swings with a machine's load."""
    if total is None or not elapsed or completed <= first:
        return None
    return (total - completed) * elapsed / (completed - first)


def plural(n: int, noun: str) -> str:
    """``n`` and the noun, in the plural unless one: "1 step", "2 steps", "1 process", "4 processes"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def progress_bar(enabled: bool = True, console: Console | None = None, every_s: float = 30.0) -> Progress:
    return _Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        disable=not enabled, transient=False, console=console, every_s=every_s,
    )
