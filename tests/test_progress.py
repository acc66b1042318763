"""Progress output where no terminal shows the bar (log files, nohup, CI)."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console

from instructrl.training.progress import pace, plural, progress_bar, time_remaining


def test_progress_prints_lines_when_not_on_a_terminal():
    out = io.StringIO()
    with progress_bar(console=Console(file=out, force_terminal=False, width=200), every_s=0.0) as bar:
        task = bar.add_task("sft", total=3, status="")
        for step in (1, 2, 3):
            bar.update(task, completed=step, status=f"loss {1.0 / step:.3f}")
    lines = [line for line in out.getvalue().splitlines() if line.startswith("sft: ")]
    assert [line.split(" after")[0] for line in lines] == ["sft: 1/3", "sft: 2/3", "sft: 3/3"]
    assert lines[-1].endswith("loss 0.333")
    assert all(" steps/s)" in line or " s/step)" in line for line in lines), lines  # the pace, as tqdm shows it
    narrow = io.StringIO()  # a narrow terminal shrinks the bar, never breaks the pace over two lines
    with progress_bar(console=Console(file=narrow, force_terminal=True, width=60)) as bar:
        task = bar.add_task("sft", total=8, status="score 1.000 (best 1.000 @ 4)")
        time.sleep(0.01)
        bar.update(task, completed=8)
    assert re.search(r"\d\.\d steps/s", narrow.getvalue()), narrow.getvalue()
    silent = io.StringIO()  # a log line at most every 30 s by default
    with progress_bar(console=Console(file=silent, force_terminal=False, width=200)) as bar:
        task = bar.add_task("sft", total=3, status="")
        bar.update(task, completed=1, status="")
    assert not [line for line in silent.getvalue().splitlines() if line.startswith("sft: ")]


def test_an_80_column_terminal_keeps_the_counts_and_times_whole_and_cuts_the_status():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80, color_system=None)
    bar = progress_bar(console=console)
    task = bar.add_task("ppo_ptx", total=64, unit="iter", status="")
    bar.update(task, completed=3, status="score +1.23  kl 0.45  gold 5.61 " + "x" * 40)
    console.print(bar.make_tasks_table(bar.tasks))
    line = out.getvalue().rstrip("\n")
    assert "\n" not in line and len(line) <= 80, line
    assert re.search(r"^ppo_ptx .* 3/64 0:00:\d\d [\d.]+ (iters/s|s/iter) eta -:--:-- score .*…$", line), line


def test_time_remaining_is_the_mean_pace_since_the_task_began():
    assert time_remaining(total=800, completed=500, first=400, elapsed=10.0) == 30.0  # resumed at 400: 10 steps a second
    assert time_remaining(total=800, completed=400, first=400, elapsed=10.0) is None  # nothing done yet: no pace
    assert time_remaining(total=None, completed=5, first=0, elapsed=1.0) is None


def test_plural_counts_one_in_the_singular():
    assert [plural(1, "step"), plural(45, "step"), plural(1, "process"), plural(2, "process"), plural(0, "iteration")] == \
        ["1 step", "45 steps", "1 process", "2 processes", "0 iterations"]


def test_pace_is_per_second_or_seconds_each():
    assert pace(done=50, elapsed=4.0, unit="step") == "12.5 steps/s"
    assert pace(done=3, elapsed=30.0, unit="iter") == "10.0 s/iter"  # slower than one a second
    assert pace(done=30, elapsed=3.0, unit="iter") == "10.0 iters/s"
    assert pace(done=0, elapsed=5.0, unit="step") == ""  # resumed, nothing done yet


def test_a_bar_or_results_table_written_to_a_log_file_is_not_cut_to_80_columns(monkeypatch):
    from instructrl.training.progress import log_console, results_console

    monkeypatch.delenv("COLUMNS", raising=False)  # pytest's captured output is no terminal, as a log file is
    assert log_console().width > 80 and results_console().width > 80  # eval's table of 8 models was cut at 80
    monkeypatch.setenv("COLUMNS", "70")
    assert log_console().width == 70 and results_console().width == 70


def test_a_bar_in_a_jupyter_notebook_keeps_rich_s_jupyter_width(monkeypatch):
    """A notebook's output is no terminal, but its cell is no log file: bars 200 columns wide wrapped there."""
    import builtins

    from instructrl.training.progress import log_console

    class ZMQInteractiveShell:  # the kernel's shell, as rich recognises a notebook
        pass

    monkeypatch.setattr(builtins, "get_ipython", ZMQInteractiveShell, raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("JUPYTER_COLUMNS", "97")
    console = log_console()
    assert console.is_jupyter and not console.is_terminal
    assert console.width == 97


def test_bars_go_to_standard_error_as_tqdms_do(capsys):
    """Standard output holds a command's results alone: `instructrl bench | jq` read a bar before the JSON."""
    with progress_bar(every_s=0.0) as bar:
        task = bar.add_task("sft", total=2, status="")
        bar.update(task, completed=1)
    out, err = capsys.readouterr()
    assert out == "" and "sft: 1/2" in err


def test_a_count_with_no_known_total_and_a_cleared_bar_off_a_terminal():
    """data check counts records whose total a .json or .csv file does not tell (the line failed on
    total None), and clears its bar when done: off a terminal rich's Progress ended with a blank line."""
    out = io.StringIO()
    with progress_bar(console=Console(file=out, force_terminal=False, width=200), every_s=0.0, transient=True) as bar:
        task = bar.add_task("data check", total=None, unit="record", status="")
        bar.update(task, completed=1000)
    assert re.fullmatch(r"data check: 1000 after \d+ s \([\d.]+ records/s\)\n", out.getvalue()), repr(out.getvalue())


def test_quiet_libraries_silences_transformers_bars_from_python(tmp_path):
    """In a notebook every model a stage loads or saves drew transformers' own bar ("Loading weights",
    "Writing model shards"); quiet_libraries, which the CLI calls, is there for Python callers too."""
    import os
    import subprocess
    import sys

    script = f"""
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from instructrl.training.progress import quiet_libraries
if sys.argv[1] == "quiet":
    quiet_libraries()
model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
model.save_pretrained({str(tmp_path)!r})
LlamaForCausalLM.from_pretrained({str(tmp_path)!r})
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def stderr(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, check=True).stderr

    assert "Loading weights" in stderr("loud")  # what the test looks for is there without it
    assert stderr("quiet") == ""
