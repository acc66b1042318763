"""The acceptance run of the foundation: the default config's pipeline (minutes; `make test-slow`).

Its fast twin is tests/test_cli.py::test_pipeline_smoke_writes_every_record.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, cli


@pytest.mark.slow
def test_default_pipeline(tmp_path):
    run_dir = tmp_path / "default"
    cli("pipeline", "-c", str(REPO / "configs" / "default.yaml"), f"run.dir={run_dir}", timeout=3600)
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    base, sft = results["base"]["overall"]["likert"], results["sft"]["overall"]["likert"]
    # "well above": at least one full Likert point on the 1-7 scale
    assert sft >= base + 1.0, (base, sft)
    # SFT follows the format: far fewer answers that fail to follow the instruction
    assert results["sft"]["overall"]["flags"]["fails_to_follow"] < results["base"]["overall"]["flags"]["fails_to_follow"] - 0.2
    # PPO-ptx's pretraining mix removes the alignment tax plain PPO pays (issue 4's acceptance)
    assert results["ppo_ptx"]["alignment_tax"] <= 0.5 * results["ppo"]["alignment_tax"], (results["ppo_ptx"]["alignment_tax"], results["ppo"]["alignment_tax"])
    assert (run_dir / "report.html").is_file()
