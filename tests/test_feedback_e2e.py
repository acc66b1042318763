"""From the feedback app to a reward model: a project's K responses sampled from a checkpoint,
rankings submitted over HTTP by two labelers, exported, and `instructrl rm` trains on the file
as it is, no conversion step."""

from __future__ import annotations

import json
import math

from conftest import SMOKE, cli
from fastapi.testclient import TestClient

from instructrl.data.inputs import read_comparisons
from instructrl.feedback.accounts import create_user
from instructrl.feedback.app import create_app
from instructrl.feedback.db import connect
from instructrl.feedback.export import export_project
from instructrl.world.build import load_tasks
from instructrl.world.labeler import SimulatedLabeler, ranks_from_qualities

N_PROMPTS = 16


def test_rankings_from_the_app_train_a_reward_model(tmp_path, smoke_base):
    base, prompts, project = smoke_base / "pretrain" / "final", smoke_base / "world" / "prompts" / "rm.jsonl", tmp_path / "label"
    cli("label", "project", "rm-data", "--dir", str(project), "--prompts", str(prompts), "--model", str(base), "--k", "4",
        "--limit", str(N_PROMPTS), "--overlap", "2", "--max-new-tokens", "8", "--guideline-version", "world-v1")
    conn = connect(project)
    labelers = [create_user(conn, name, "labeler", "secret") for name in ("ann", "bob")]
    tasks = {t.id: t for t in load_tasks(prompts)}
    app = create_app(project)
    for user in labelers:  # each labeler ranks what they see, as a person would in the browser
        http = TestClient(app, headers={"Authorization": f"Bearer {user.token}"})
        judge = SimulatedLabeler(user.name, noise=0.3)
        while (view := http.post("/api/projects/1/next", json={"kind": "rank"}).json()["assignment"]) is not None:
            judgements = [judge.judge(tasks[view["prompt_id"]], r) for r in view["responses"]]
            body = {"likert": [j.likert for j in judgements], "flags": [list(j.flags) for j in judgements],
                    "ranks": ranks_from_qualities([j.quality for j in judgements])}
            assert http.post(f"/api/assignments/{view['id']}/submit", json=body).status_code == 200
    export_project(conn, 1, project / "exports" / "1")  # what `instructrl label export` and the Export button run
    data = project / "exports" / "1" / "comparisons.jsonl"
    records = read_comparisons(data)
    assert len(records) == 2 * N_PROMPTS and {r.labeler_id for r in records} == {"ann", "bob"}
    assert all(len(r.responses) == 4 and r.guideline_version == "world-v1" for r in records)
    assert len(read_comparisons(project / "exports" / "1" / "comparisons_aggregated.jsonl")) == N_PROMPTS

    proc = cli("rm", "-c", str(SMOKE), f"run.dir={tmp_path / 'run'}", f"rm.data={data}", f"rm.model={base}")
    held_out = 2 * int(N_PROMPTS * 0.1)  # rm.heldout_fraction of the prompts, with both labelers' rankings of each
    assert f"rm: {len(records) - held_out} comparisons (120 responses) from {data}, {held_out} held out" in " ".join(proc.stderr.split())
    assert (tmp_path / "run" / "rm" / "final" / "config.json").is_file()
    losses = [m["train/loss"] for m in map(json.loads, (tmp_path / "run" / "rm" / "metrics.jsonl").read_text().splitlines()) if "train/loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)
    lineage = json.loads((tmp_path / "run" / "rm" / "lineage.json").read_text())
    assert lineage["inputs"]["comparisons"]["path"] == str(data)
