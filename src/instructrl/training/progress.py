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

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.disable or self.console.is_terminal or time.monotonic() - self._last_line < self.every_s:
            return
        self._last_line = time.monotonic()
        task = self._tasks[task_id]
        remaining = f", eta {task.time_remaining:.0f} s" if task.time_remaining is not None else ""
        self.console.print(f"{task.description}: {task.completed:.0f}/{task.total:.0f} after {task.elapsed or 0:.0f} s{remaining}  "
                           f"{task.fields.get('status', '')}".rstrip(), highlight=False, soft_wrap=True)


def progress_bar(enabled: bool = True, console: Console | None = None, every_s: float = 30.0) -> Progress:
    return _Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        disable=not enabled, transient=False, console=console, every_s=every_s,
    )
