"""``python -m instructrl.cli``, which ran the command while it was one module, cli.py (``python -m instructrl`` is the same)."""

from instructrl.cli import run

run()
