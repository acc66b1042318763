"""A labeler in a real browser (Debian's chromium, headless, driven by Playwright): write a
demonstration, score and rank K responses with the mouse and with the keyboard, judge an A/B
comparison; then the admin exports and the files hold exactly what was done in the browser,
under a Content-Security-Policy that runs only the app's own script file.

Screenshots of every page are kept under the test's tmp folder (the path is printed).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from feedback_util import make_project, rank_task, start_server
from ports import free_port

from instructrl.data.inputs import read_comparisons

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
WRITE = {"kind": "write", "prompt_id": "w1", "prompt": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
                                                         {"role": "user", "content": "Now double it."}]}
COMPARE = {"kind": "compare", "prompt_id": "c1", "prompt": [{"role": "user", "content": "Reverse 'cat'."}], "responses": ["tac", "cat"],
           "sources": ["ppo", "sft"]}

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None and not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is missing: `make test` installs it (apt-get install chromium)")


@contextmanager
def served_browser(project_dir: Path):
    """The feedback app serving ``project_dir`` on a free port, and a headless chromium: (browser, base URL)."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_server(project_dir, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            try:
                yield browser, f"http://127.0.0.1:{port}"
            finally:
                browser.close()
    finally:
        server.kill()
        server.wait()


def new_page(browser, **options):
    page = browser.new_page(**options)
    page.set_default_timeout(20_000)
    return page


def next_task_page(page, url: str) -> None:
    """Wait for the next task's page after ``url``. (Playwright's wait_for_function runs its
    predicate with eval, which the app's Content-Security-Policy refuses.)"""
    page.wait_for_url(lambda next_url: next_url != url)
    page.wait_for_selector("#scoring")


def ranking_order(page) -> list[int]:
    return [int(p) for p in page.eval_on_selector_all("#ranking .rank-item", "items => items.map(i => i.dataset.pos)")]


def test_a_labeler_in_the_browser(tmp_path):
    _, pid, _ = make_project(tmp_path / "project", {"root": "admin", "ann": "labeler"}, [WRITE, rank_task(0), rank_task(1), COMPARE],
                             guidelines="Prefer correct, concise answers. Flag filler as verbose.")
    shots = tmp_path / "screenshots"
    print(f"\nscreenshots of each task page: {shots}")
    with served_browser(tmp_path / "project") as (browser, base):
        page = new_page(browser, viewport={"width": 1280, "height": 1000})
        dialogs, refused = [], []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.dismiss()))
        page.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None)

        # log in
        page.goto(base + "/")
        page.fill("#name", "ann")
        page.fill("#password", "annann")
        page.screenshot(path=shots / "0-login.png")
        page.click("#login")
        page.wait_for_selector(f"#start-{pid}-write")

        # write: a multi-turn prompt shown as a conversation; drafts autosave; leaving asks first
        page.click(f"#start-{pid}-write")
        page.wait_for_selector("#answer")
        assert page.locator(".conversation .turn").count() == 3
        assert "Flag filler as verbose." in page.inner_text(".guidelines")
        page.locator("#answer").press_sequentially("It is 10.")
        page.click(".brand", no_wait_after=True)  # leave before the draft is saved
        page.wait_for_timeout(300)
        assert dialogs == ["beforeunload"] and "/assignments/" in page.url
        page.wait_for_selector("#draft-status:has-text('Draft saved')")
        page.reload()
        assert page.input_value("#answer") == "It is 10."  # the draft came back from the server
        page.screenshot(path=shots / "1-write.png", full_page=True)
        page.click("#submit")
        page.wait_for_selector("#message")  # no write task left

        # rank with the mouse: scores and flags first, then drag and drop, one tie
        page.goto(f"{base}/projects/{pid}/next?kind=rank")
        page.wait_for_selector("#scoring")
        assert page.is_hidden("#ranking-section")
        mouse_texts = [page.inner_text(f"#response-{p} .content") for p in range(4)]
        mouse_likert = [6, 3, 5, 1]
        for p, score in enumerate(mouse_likert):
            page.click(f"#likert-{p}-{score}")
        page.click("#flag-1-incorrect")
        page.click("#flag-3-fails_to_follow")
        assert page.is_visible("#ranking-section")
        page.drag_and_drop("#rank-2", "#rank-1", target_position={"x": 20, "y": 4})
        assert ranking_order(page) == [0, 2, 1, 3]
        page.click("#tie-1")  # response B (now third) ties with C above it
        assert page.inner_text("#rank-1 .place") == page.inner_text("#rank-2 .place") == "2."
        page.screenshot(path=shots / "2-rank-mouse.png", full_page=True)
        mouse_ranks = [0, 1, 1, 2]  # by display position
        first_url = page.url
        page.click("#submit")
        next_task_page(page, first_url)

        # rank with the keyboard only: digits score the focused response, arrows move, T ties
        keyboard_texts = [page.inner_text(f"#response-{p} .content") for p in range(4)]
        keyboard_likert = [2, 7, 4, 4]
        for p, score in enumerate(keyboard_likert):
            page.focus(f"#response-{p}")
            page.keyboard.press(str(score))
        page.focus("#flag-0-verbose")
        page.keyboard.press("Space")
        page.focus("#rank-1")
        page.keyboard.press("ArrowUp")  # B first
        page.focus("#rank-3")
        page.keyboard.press("ArrowUp")
        page.keyboard.press("ArrowUp")  # D second
        page.keyboard.press("t")  # ... tied with B
        assert ranking_order(page) == [1, 3, 0, 2]
        page.focus("#none-acceptable")
        page.keyboard.press("Space")
        page.screenshot(path=shots / "3-rank-keyboard.png", full_page=True)
        keyboard_ranks = [1, 0, 2, 0]
        page.focus("#submit")
        page.keyboard.press("Enter")
        page.wait_for_selector("#message")  # no rank task left

        # compare: side by side, the right one is better; an arrow key only picks, Enter submits
        page.goto(f"{base}/projects/{pid}/next?kind=compare")
        page.wait_for_selector("#choose-right")
        right_text = page.inner_text("#answer-right .content")
        page.screenshot(path=shots / "4-compare.png", full_page=True)
        page.keyboard.press("ArrowLeft")
        page.wait_for_timeout(300)
        assert page.evaluate("document.activeElement.id") == "choose-left" and page.locator("#message").count() == 0
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        page.wait_for_selector("#message")
        assert dialogs == ["beforeunload"]  # no other page asked before leaving

        # the admin exports with the button
        admin = new_page(browser, viewport={"width": 1280, "height": 1000})
        admin.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None)
        admin.goto(base + "/admin")
        admin.fill("#name", "root")
        admin.fill("#password", "rootroot")
        admin.click("#login")
        admin.wait_for_selector(f"#export-{pid}")
        admin.screenshot(path=shots / "5-admin.png", full_page=True)
        admin.click(f"#export-{pid}")
        admin.wait_for_selector("#files")
        assert "comparisons.jsonl: 2 records" in admin.inner_text("#files")
        admin.screenshot(path=shots / "6-export.png", full_page=True)

        # the policy (script-src 'self') refused nothing the pages use, and refuses a script injected into one
        assert refused == []
        ran = admin.evaluate("""() => { const s = document.createElement('script'); s.textContent = 'window.injected = true';
                                        document.head.append(s); return window.injected === true; }""")
        assert ran is False

    out = tmp_path / "project" / "exports" / str(pid)
    demos = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
    assert [d["messages"] for d in demos] == [WRITE["prompt"] + [{"role": "assistant", "content": "It is 10."}]]
    records = {r.id: r for r in read_comparisons(out / "comparisons.jsonl")}
    for record, texts, likert, ranks in ((records["r0"], mouse_texts, mouse_likert, mouse_ranks),
                                         (records["r1"], keyboard_texts, keyboard_likert, keyboard_ranks)):
        shown = [record.responses.index(t) for t in texts]  # display position -> task order
        assert [record.ranks[i] for i in shown] == ranks  # order and ties as ranked in the browser
        assert [record.likert[i] for i in shown] == likert
        assert record.labeler_id == "ann"
    assert records["r0"].flags[records["r0"].responses.index(mouse_texts[1])] == ["incorrect"]
    assert records["r1"].flags[records["r1"].responses.index(keyboard_texts[0])] == ["verbose"]
    assert (records["r0"].none_acceptable, records["r1"].none_acceptable) == (False, True)
    compare = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert compare[0]["winner"] == COMPARE["sources"][COMPARE["responses"].index(right_text)]
    assert sorted(p.name for p in shots.iterdir()) == ["0-login.png", "1-write.png", "2-rank-mouse.png", "3-rank-keyboard.png",
                                                       "4-compare.png", "5-admin.png", "6-export.png"]


def test_a_labeler_on_a_phone(tmp_path):
    """A 375-pixel-wide phone: the page fits its width (a 3,000-character word wraps, the
    guidelines go below the task) and right-to-left text reads right to left."""
    arabic = "مرحبا بالعالم! كيف حالك؟"
    task = {"kind": "rank", "prompt_id": "r0", "prompt": [{"role": "user", "content": "שלום, מה שלומך?"}],
            "responses": ["x" * 3000, arabic, "fine.", "ok " * 300]}
    _, pid, _ = make_project(tmp_path / "project", {"ann": "labeler"}, [task], guidelines="Be kind. " * 60)
    with served_browser(tmp_path / "project") as (browser, base):
        page = new_page(browser, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
        page.goto(f"{base}/projects/{pid}/next?kind=rank")
        page.fill("#name", "ann")
        page.fill("#password", "annann")
        page.click("#login")
        page.wait_for_selector("#scoring")
        page.screenshot(path=tmp_path / "phone.png", full_page=True)
        layout = page.evaluate("""() => ({width: innerWidth, scrolls: document.documentElement.scrollWidth,
            task: document.querySelector('#task').getBoundingClientRect().width,
            direction: Object.fromEntries([...document.querySelectorAll('.content')].map(
                e => [e.textContent.slice(0, 5), getComputedStyle(e).direction]))})""")
    assert layout["width"] == 375 and layout["scrolls"] <= 375  # the phone's width, no sideways scrolling
    assert layout["task"] > 0.9 * 375  # not squeezed beside the guidelines
    assert layout["direction"][arabic[:5]] == layout["direction"]["שלום,"] == "rtl"
    assert layout["direction"]["fine."] == layout["direction"]["Be ki"] == "ltr"


def test_a_submission_on_a_bad_connection(tmp_path):
    """No reply: the answers stay on the page to submit again. A reply lost after the answer was
    stored: submitting (or skipping) again goes on to the next task (it was a 409 the labeler was
    stuck on). A double click sends one answer."""
    conn, pid, _ = make_project(tmp_path / "project", {"ann": "labeler"}, [rank_task(i) for i in range(3)])
    with served_browser(tmp_path / "project") as (browser, base):
        page = new_page(browser)
        sent = []
        page.on("request", lambda request: sent.append(request.url) if request.url.endswith("/submit") else None)
        page.goto(f"{base}/projects/{pid}/next?kind=rank")
        page.fill("#name", "ann")
        page.fill("#password", "annann")
        page.click("#login")
        page.wait_for_selector("#scoring")
        first_url = page.url
        for p in range(4):
            page.click(f"#likert-{p}-{p + 2}")
        page.route("**/submit", lambda route: route.abort("internetdisconnected"))
        page.click("#submit")
        page.wait_for_selector("#error:has-text('Nothing is lost')")
        assert page.is_checked("#likert-3-5") and page.url == first_url
        page.unroute("**/submit")

        def stored_but_reply_lost(route):
            route.fetch()
            route.abort("connectionreset")

        page.route("**/submit", stored_but_reply_lost)
        page.click("#submit")
        page.wait_for_selector("#error:has-text('Nothing is lost')")
        page.unroute("**/submit")
        page.click("#submit")  # the server answers 409: already stored
        next_task_page(page, first_url)

        del sent[:]
        second_url = page.url
        for p in range(4):
            page.click(f"#likert-{p}-4")
        page.dblclick("#submit")
        next_task_page(page, second_url)

        page.click(".skip summary")  # a skip whose reply is lost, skipped again
        page.fill("#skip-reason", "I cannot judge this")
        page.route("**/skip", stored_but_reply_lost)
        page.click("#skip")
        page.wait_for_selector("#error:has-text('Nothing is lost')")
        page.unroute("**/skip")
        page.click("#skip")
        page.wait_for_selector("#message")  # nothing left
    assert len(sent) == 1
    answers = [json.loads(a) for (a,) in conn.execute("SELECT answer FROM assignments WHERE state = 'submitted' ORDER BY id")]
    assert len(answers) == 2 and sorted(answers[0]["likert"]) == [2, 3, 4, 5] and answers[1]["likert"] == [4] * 4
    assert [tuple(r) for r in conn.execute("SELECT skip_reason FROM assignments WHERE state = 'skipped'")] == [("I cannot judge this",)]
