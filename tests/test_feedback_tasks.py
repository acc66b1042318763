"""Who gets which task: overlap, skips, leases, display order, answers in the task's order. No HTTP."""

from __future__ import annotations

import json

import pytest
from feedback_util import make_project, rank_task
from hypothesis import given
from hypothesis import strategies as st

from instructrl.feedback import tasks
from instructrl.feedback.db import connect
from instructrl.feedback.tasks import Conflict, Forbidden, Invalid, dense_ranks, next_task, parse_answer, skip, submit

LABELERS = {"ann": "labeler", "bob": "labeler", "cat": "labeler"}
WRITE = {"kind": "write", "prompt_id": "w", "prompt": [{"role": "user", "content": "Double 5."}]}


def rank_body(k: int, ranks: list[int]) -> dict:
    return {"likert": [4] * k, "flags": [[] for _ in range(k)], "ranks": ranks}


def test_overlap_gives_each_task_to_n_different_labelers(tmp_path):
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0)], overlap=2)
    a, b, c = (next_task(conn, pid, users[n]) for n in ("ann", "bob", "cat"))
    assert a is not None and b is not None and a != b
    assert c is None  # two live leases fill the overlap of 2
    assert next_task(conn, pid, users["ann"]) == a  # asking again returns the lease one holds
    submit(conn, a, users["ann"], rank_body(4, [0, 1, 2, 3]))
    assert next_task(conn, pid, users["ann"]) is None  # nobody judges a task twice
    with pytest.raises(Conflict):
        submit(conn, a, users["ann"], rank_body(4, [0, 1, 2, 3]))  # stored once
    assert conn.execute("SELECT COUNT(*) FROM assignments WHERE state = 'submitted'").fetchone()[0] == 1


def test_a_skipped_task_never_comes_back_and_goes_to_someone_else(tmp_path):
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0), rank_task(1)], overlap=1)
    first = next_task(conn, pid, users["ann"])
    with pytest.raises(Invalid) as err:
        skip(conn, first, users["ann"], "  ")
    assert err.value.field == "reason"
    skip(conn, first, users["ann"], "cannot read this language")
    second = next_task(conn, pid, users["ann"])
    assert second != first
    submit(conn, second, users["ann"], rank_body(4, [0, 0, 1, 1]))
    assert next_task(conn, pid, users["ann"]) is None
    bobs = next_task(conn, pid, users["bob"])  # the skipped task is free for others
    assert conn.execute("SELECT task_id FROM assignments WHERE id = ?", (bobs,)).fetchone()[0] == \
        conn.execute("SELECT task_id FROM assignments WHERE id = ?", (first,)).fetchone()[0]
    row = conn.execute("SELECT skip_reason FROM assignments WHERE id = ?", (first,)).fetchone()
    assert row["skip_reason"] == "cannot read this language"


def test_an_expired_lease_frees_the_task(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(tasks, "now", lambda: clock[0])
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0)], overlap=1, lease_seconds=60)
    held = next_task(conn, pid, users["ann"])
    assert next_task(conn, pid, users["bob"]) is None  # ann holds it
    clock[0] += 61
    bobs = next_task(conn, pid, users["bob"])
    assert bobs is not None and bobs != held
    clock[0] += 12.5
    submit(conn, bobs, users["bob"], rank_body(4, [3, 2, 1, 0]))
    with pytest.raises(Conflict, match="lease"):
        submit(conn, held, users["ann"], rank_body(4, [0, 1, 2, 3]))
    # time spent: from the lease to the submission
    assert conn.execute("SELECT seconds_spent FROM assignments WHERE id = ?", (bobs,)).fetchone()[0] == 12.5


def test_an_expired_lease_nobody_took_can_still_be_submitted(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tasks, "now", lambda: clock[0])
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0)], overlap=1, lease_seconds=60)
    held = next_task(conn, pid, users["ann"])
    clock[0] += 3600  # a long lunch
    submit(conn, held, users["ann"], rank_body(4, [0, 1, 2, 3]))
    assert next_task(conn, pid, users["bob"]) is None


def test_a_draft_is_refused_where_a_submission_would_be(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tasks, "now", lambda: clock[0])
    conn, pid, users = make_project(tmp_path, LABELERS, [WRITE], overlap=1, lease_seconds=60)
    held = next_task(conn, pid, users["ann"])
    clock[0] += 61  # expired, but nobody took it: the draft is kept and renews the lease
    tasks.save_draft(conn, held, users["ann"], "It is")
    assert next_task(conn, pid, users["bob"]) is None
    clock[0] += 61  # expired again, and bob takes it
    bobs = next_task(conn, pid, users["bob"])
    with pytest.raises(Conflict, match="other labelers took it"):
        tasks.save_draft(conn, held, users["ann"], "It is 10.")
    submit(conn, bobs, users["bob"], {"text": "10"})
    with pytest.raises(Conflict):
        submit(conn, held, users["ann"], {"text": "It is 10."})
    assert tasks.assignment_view(conn, held, users["ann"])["draft"] == "It is"
    assert tasks.progress(conn, pid)["kinds"]["write"]["submitted"] == 1  # overlap 1: one answer


def test_a_project_comes_with_all_its_tasks_or_not_at_all(tmp_path):
    conn, _, _ = make_project(tmp_path, LABELERS, [])
    too_many = rank_task(1, [f"resp{i}" for i in range(10)])
    with pytest.raises(Invalid, match="cannot hold 10 responses"):
        tasks.create_project(conn, tasks.ProjectSettings(name="q"), [rank_task(0), too_many])
    with pytest.raises(tasks.NotFound):
        tasks.project_by_name(conn, "q")
    pid = tasks.create_project(conn, tasks.ProjectSettings(name="q"), [rank_task(0)])
    assert conn.execute("SELECT COUNT(*) FROM tasks WHERE project_id = ?", (pid,)).fetchone()[0] == 1


def test_labelers_see_their_own_shuffled_order_and_answers_come_back_in_task_order(tmp_path):
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0, [f"resp{i}" for i in range(6)])], overlap=3)
    orders = {}
    for name in LABELERS:
        view = tasks.assignment_view(conn, next_task(conn, pid, users[name]), users[name])
        assert "sources" not in view and sorted(view["responses"]) == [f"resp{i} (0)" for i in range(6)]
        orders[name] = view
    assert len({tuple(v["responses"]) for v in orders.values()}) > 1  # not everyone sees the same order
    view = orders["bob"]
    # bob ranks what he sees top to bottom, the 2nd and 3rd tied; the stored answer follows the task
    stored = submit(conn, view["id"], users["bob"], {"likert": [7, 6, 6, 3, 2, 1], "flags": [[], [], ["verbose"], [], [], []],
                                                     "ranks": [0, 1, 1, 2, 3, 4], "none_acceptable": False})
    by_text = {r: (stored["ranks"][int(r[4])], stored["likert"][int(r[4])]) for r in view["responses"]}
    assert [by_text[r] for r in view["responses"]] == [(0, 7), (1, 6), (1, 6), (2, 3), (3, 2), (4, 1)]
    assert stored["flags"][int(view["responses"][2][4])] == ["verbose"]
    # and bob sees his answer again in his own order
    assert tasks.assignment_view(conn, view["id"], users["bob"])["answer"]["ranks"] == [0, 1, 1, 2, 3, 4]


def test_nobody_opens_another_labelers_task(tmp_path):
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0)])
    mine = next_task(conn, pid, users["ann"])
    for call in (lambda: tasks.assignment_view(conn, mine, users["bob"]), lambda: submit(conn, mine, users["bob"], rank_body(4, [0] * 4)),
                 lambda: tasks.save_draft(conn, mine, users["bob"], "x"), lambda: skip(conn, mine, users["bob"], "x")):
        with pytest.raises(Forbidden):
            call()


def test_answers_are_validated_with_the_field_named():
    order = [1, 0, 2]
    cases = [
        ({"likert": [1, 2], "flags": [[], [], []], "ranks": [0, 1, 2]}, "likert"),
        ({"likert": [1, 2, 8], "flags": [[], [], []], "ranks": [0, 1, 2]}, "likert.2"),
        ({"likert": [1, 2, 3], "flags": [[], ["rude"], []], "ranks": [0, 1, 2]}, "flags.1"),
        ({"likert": [1, 2, 3], "flags": [[], [], []], "ranks": [0, -1, 2]}, "ranks"),
        ({"likert": [1, 2, 3], "flags": [[], [], []]}, "ranks"),
        ({"likert": [1, 2, "x"], "flags": [[], [], []], "ranks": [0, 1, 2]}, "likert.2"),
        ({"likert": [1, 2, 3], "flags": [[], [], []], "ranks": [0, 1, 2], "extra": 1}, "extra"),
    ]
    for body, field in cases:
        with pytest.raises(Invalid) as err:
            parse_answer("rank", body, order)
        assert err.value.field == field, body
    with pytest.raises(Invalid) as err:
        parse_answer("compare", {"choice": "both"}, [0, 1])
    assert err.value.field == "choice"
    with pytest.raises(Invalid) as err:
        parse_answer("write", {"text": "   "}, [])
    assert err.value.field == "text"
    # compare: the display order decides which model "left" is
    assert parse_answer("compare", {"choice": "left"}, [1, 0]) == {"winner": 1}
    assert parse_answer("compare", {"choice": "tie"}, [1, 0]) == {"winner": None}


def test_answers_are_not_coerced_and_hold_only_storable_text():
    good = {"likert": [1, 2, 3], "flags": [[], [], []], "ranks": [0, 1, 2]}
    cases = [
        ({**good, "likert": [1, "2", 3]}, "likert.1"),
        ({**good, "likert": [1, True, 3]}, "likert.1"),
        ({**good, "likert": [1, 2, 3.0]}, "likert.2"),
        ({**good, "ranks": [0, False, 2]}, "ranks.1"),
        ({**good, "none_acceptable": "yes"}, "none_acceptable"),
        ({**good, "flags": [["\ud800"], [], []]}, "flags.0.0"),
    ]
    for body, field in cases:
        with pytest.raises(Invalid) as err:
            parse_answer("rank", body, [1, 0, 2])
        assert err.value.field == field, body
    with pytest.raises(Invalid, match="not valid Unicode") as err:
        parse_answer("write", {"text": "It is 10 \ud800"}, [])  # a lone surrogate, as JSON's "\ud800" decodes
    assert err.value.field == "text"
    with pytest.raises(ValueError, match="not valid Unicode"):
        tasks.ProjectSettings(name="p", guideline_version="v\udcff")  # e.g. a command-line argument that is not UTF-8


@given(st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=9))
def test_dense_ranks_keep_order_and_ties(ranks):
    dense = dense_ranks(ranks)
    assert sorted(set(dense)) == list(range(len(set(ranks))))
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            assert (ranks[i] < ranks[j]) == (dense[i] < dense[j]) and (ranks[i] == ranks[j]) == (dense[i] == dense[j])


def test_each_answer_keeps_the_guideline_version_it_was_given_under(tmp_path):
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0), rank_task(1)])
    first_version = tasks.project_by_id(conn, pid)["guideline_version"]
    submit(conn, next_task(conn, pid, users["ann"]), users["ann"], rank_body(4, [0, 1, 2, 3]))
    tasks.set_guidelines(conn, pid, "Prefer correct answers; penalise filler.", "v2")
    submit(conn, next_task(conn, pid, users["ann"]), users["ann"], rank_body(4, [0, 1, 2, 3]))
    versions = [a["guideline_version"] for a in tasks.submitted_answers(conn, pid, "rank")]
    assert versions == [first_version, "v2"] and first_version.startswith("sha256:")


def test_progress_counts_per_kind_and_labeler(tmp_path):
    conn, pid, users = make_project(tmp_path, LABELERS, [rank_task(0), rank_task(1),
                                                          {"kind": "write", "prompt_id": "w", "prompt": [{"role": "user", "content": "hi"}]}], overlap=2)
    submit(conn, next_task(conn, pid, users["ann"], "rank"), users["ann"], rank_body(4, [0, 1, 2, 3]))
    skip(conn, next_task(conn, pid, users["ann"], "rank"), users["ann"], "unsure")
    next_task(conn, pid, users["bob"], "write")
    report = tasks.progress(conn, pid)
    assert report["kinds"]["rank"] == {"tasks": 2, "tasks_complete": 0, "answers_needed": 4, "submitted": 1, "skipped": 1, "leased": 0, "done": 0.25}
    assert report["kinds"]["write"]["leased"] == 1
    assert report["labelers"]["ann"]["submitted"] == 1 and report["labelers"]["ann"]["skipped"] == 1
    assert json.dumps(report)  # plain data


class SubmitsBetweenReads:
    """A connection on which, after each query, another labeler submits an answer on their own connection."""

    def __init__(self, conn, submissions):
        self.conn, self.submissions = conn, iter(submissions)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql, *args):
        cursor = self.conn.execute(sql, *args)
        if sql.lstrip().upper().startswith("SELECT"):
            next(self.submissions, lambda: None)()
        return cursor


def test_progress_counts_come_from_one_snapshot_while_people_submit(tmp_path):
    labelers = {f"l{i}": "labeler" for i in range(8)}
    conn, pid, users = make_project(tmp_path, labelers, [rank_task(0), rank_task(1)], overlap=8)
    leases = [(user, next_task(conn, pid, user)) for user in users.values()]

    def submits(user, assignment):
        def run():
            other = connect(tmp_path)
            submit(other, assignment, user, rank_body(4, [0, 1, 2, 3]))
            other.close()
        return run

    quiet = tasks.progress(conn, pid)
    busy = tasks.progress(SubmitsBetweenReads(conn, [submits(*lease) for lease in leases]), pid)
    # every figure is the database as it was at progress's first read: per kind and per labeler agree
    assert busy == quiet and busy["kinds"]["rank"]["leased"] == 8
    assert sum(entry["submitted"] for entry in tasks.progress(conn, pid)["labelers"].values()) > 0  # they did submit meanwhile
