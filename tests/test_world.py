"""The built-in world: instruction families, the corpus, and the prompt splits written to disk."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from conftest import SMOKE, cli

from instructrl.config import WorldConfig
from instructrl.errors import UserError
from instructrl.world.build import WorldFiles, build_world, build_world_once, make_splits, split_sizes
from instructrl.world.corpus import corpus_documents
from instructrl.world.tasks import FAMILIES, canonical, sample_task
from instructrl.world.vocab import ORDINALS

# Small worlds keep every test well under a second.
SMALL = dict(n_prompts=300, n_val=20, n_eval=30, corpus_documents=100, heldout_documents=10)


# ---------------------------------------------------------------- family answers


@pytest.mark.parametrize(
    "family, args, expected",
    [
        # 'tiger' reversed letter by letter: r-e-g-i-t
        ("reverse_word", {"word": "tiger"}, "regit"),
        # 5 2 9 in ascending order: 2 < 5 < 9
        ("sort_numbers", {"nums": "5 2 9"}, "2 5 9"),
        # two-digit numbers sort by value, not as text: 7 < 10 < 42
        ("sort_numbers", {"nums": "42 7 10"}, "7 10 42"),
        # 17 + 25 = 42
        ("add_numbers", {"a": 17, "b": 25}, "42"),
        # cat / dog / pear: three comma-separated items
        ("count_items", {"items": "cat, dog, pear"}, "3"),
        # every letter of 'red cat' capitalised, the space kept
        ("uppercase", {"phrase": "red cat"}, "RED CAT"),
        # 'cat' three times, separated by single spaces
        ("repeat_word", {"word": "cat", "n": 3}, "cat cat cat"),
        # max(12, 70) = 70, whichever side it is on
        ("larger_number", {"a": 12, "b": 70}, "70"),
        ("larger_number", {"a": 70, "b": 12}, "70"),
        # k is 1-based: word 2 of 'red cat pear' is 'cat', word 1 is 'red'
        ("kth_word", {"phrase": "red cat pear", "k": 2, "ordinal": "second"}, "cat"),
        ("kth_word", {"phrase": "red cat pear", "k": 1, "ordinal": "first"}, "red"),
        # 'mango' begins with m
        ("first_letter", {"word": "mango"}, "m"),
    ],
)
def test_family_answer(family, args, expected):
    assert FAMILIES[family].answer(args) == expected


def _answer_worked_out(family: str, args: dict) -> str:
    """Each family's gold answer, computed again without the family's code."""
    return {
        "reverse_word": lambda: "".join(reversed(args["word"])),
        "sort_numbers": lambda: " ".join(str(n) for n in sorted(map(int, args["nums"].split()))),
        "add_numbers": lambda: str(args["a"] + args["b"]),
        "count_items": lambda: str(args["items"].count(",") + 1),
        "uppercase": lambda: "".join(c.upper() for c in args["phrase"]),
        "repeat_word": lambda: " ".join(args["word"] for _ in range(args["n"])),
        "larger_number": lambda: str(max(args["a"], args["b"])),
        "kth_word": lambda: args["phrase"].split()[args["k"] - 1],
        "first_letter": lambda: args["word"][0],
    }[family]()


def test_every_sampled_prompt_has_its_gold_answer_and_one_reading():
    rng = random.Random(0)
    for _ in range(3000):
        task = sample_task(rng, multi_turn_rate=0.3)
        args = task.args
        assert task.answer == _answer_worked_out(task.family, args), task
        # no input that would make the question ambiguous
        if task.family == "larger_number":
            assert args["a"] != args["b"], task  # no tie to pick from
        if task.family == "sort_numbers":
            assert len(set(args["nums"].split())) == len(args["nums"].split()), task
        if task.family in ("count_items", "kth_word"):
            items = args["items"].split(", ") if task.family == "count_items" else args["phrase"].split()
            assert len(set(items)) == len(items), task  # counted or picked out, each item once
        if task.family == "kth_word":
            assert args["ordinal"] == ORDINALS[args["k"] - 1] and 1 <= args["k"] <= len(args["phrase"].split()), task
        if task.family == "first_letter":
            assert args["word"] == args["word"].lower(), task  # its first letter is lower case, as the answer


def test_there_are_nine_families():
    # reverse, sort, add, count, uppercase, repeat, larger, kth word, first letter
    assert len(FAMILIES) == 9


# ---------------------------------------------------------------- canonical


@pytest.mark.parametrize(
    "text, expected",
    [
        ("REGIT", "regit"),  # case folded
        ("2, 5, 9", "2 5 9"),  # commas become spaces, then runs of spaces collapse
        ("regit.", "regit"),  # one final stop dropped
        ("regit!!", "regit"),  # a run of final ! dropped
        ("  cat   cat  ", "cat cat"),  # outer spaces stripped, inner runs collapsed
        ("a.b", "a.b"),  # a stop inside the text is content, not a final stop
    ],
)
def test_canonical(text, expected):
    assert canonical(text) == expected


# ---------------------------------------------------------------- determinism


def ids_by_split(splits):
    return {name: [t.id for t in tasks] for name, tasks in splits.items()}


def test_make_splits_is_deterministic():
    config = WorldConfig(seed=3, **SMALL)
    assert ids_by_split(make_splits(config)) == ids_by_split(make_splits(config))


def test_a_different_world_seed_gives_different_prompts():
    first = ids_by_split(make_splits(WorldConfig(seed=3, **SMALL)))
    second = ids_by_split(make_splits(WorldConfig(seed=4, **SMALL)))
    # every split is drawn afresh from another random stream
    for name in first:
        assert first[name] != second[name], name


def test_corpus_documents_are_deterministic():
    assert corpus_documents(30, seed=5) == corpus_documents(30, seed=5)
    assert corpus_documents(30, seed=5) != corpus_documents(30, seed=6)


# ---------------------------------------------------------------- splits


def test_splits_are_disjoint():
    splits = make_splits(WorldConfig(**SMALL))
    seen_ids, seen_messages = {}, {}
    for name, tasks in splits.items():
        for task in tasks:
            key = tuple((m["role"], m["content"]) for m in task.messages)
            assert task.id not in seen_ids, (task.id, seen_ids.get(task.id), name)
            assert key not in seen_messages, (key, seen_messages.get(key), name)
            seen_ids[task.id], seen_messages[key] = name, name


def test_split_lengths_follow_split_sizes():
    config = WorldConfig(**SMALL)
    splits = make_splits(config)
    assert {name: len(tasks) for name, tasks in splits.items()} == split_sizes(config)


def test_split_sizes_are_13_33_31():
    sizes = split_sizes(WorldConfig(n_prompts=770, n_val=20, n_eval=30))
    # 13 + 33 + 31 = 77 and 770 / 77 = 10, so the ratio scales exactly: 130 : 330 : 310
    assert sizes == {"sft": 130, "rm": 330, "ppo": 310, "val": 20, "eval": 30}


def test_split_sizes_give_the_rounding_remainder_to_sft():
    sizes = split_sizes(WorldConfig(n_prompts=100, n_val=20, n_eval=30))
    # 1300 // 77 = 16 (77 * 16 = 1232), 3300 // 77 = 42 (3234), 3100 // 77 = 40 (3080);
    # 16 + 42 + 40 = 98, so sft takes the 2 left over: 18
    assert (sizes["sft"], sizes["rm"], sizes["ppo"]) == (18, 42, 40)


# ---------------------------------------------------------------- multi-turn prompts


@pytest.fixture(scope="module")
def multi_turn_tasks():
    splits = make_splits(WorldConfig(multi_turn_rate=1.0, **SMALL))
    return [task for tasks in splits.values() for task in tasks]


def test_multi_turn_prompts_are_user_assistant_user(multi_turn_tasks):
    for task in multi_turn_tasks:
        assert [m["role"] for m in task.messages] == ["user", "assistant", "user"], task


def test_add_first_turn_is_answered_with_the_sum(multi_turn_tasks):
    adds = [t for t in multi_turn_tasks if t.family == "add_numbers"]
    assert adds
    for task in adds:
        # every Add phrasing quotes exactly its two operands, a then b
        a, b = map(int, re.findall(r"\d+", task.messages[0]["content"]))
        assert task.messages[1]["content"] == str(a + b), task


def test_add_follow_up_adds_to_the_previous_answer(multi_turn_tasks):
    follow_ups = [
        t for t in multi_turn_tasks
        if t.family == "add_numbers" and re.fullmatch(r"(Now add \d+ to that|Add \d+ to the result)\.", t.messages[2]["content"])
    ]
    assert follow_ups  # about half the Add prompts (rate 0.5) use this follow-up
    for task in follow_ups:
        (n,) = map(int, re.findall(r"\d+", task.messages[2]["content"]))
        previous = int(task.messages[1]["content"])
        # "add N to that": the gold answer is the previous assistant answer plus N
        assert task.answer == str(previous + n), task


# ---------------------------------------------------------------- corpus


def test_corpus_has_no_chat_format():
    text = "\n".join(corpus_documents(200, seed=0))
    assert "<|user|>" not in text
    assert "<|assistant|>" not in text
    # the corpus states facts; it never asks questions
    assert "?" not in text


def test_corpus_has_no_instruction_phrasings():
    text = "\n".join(corpus_documents(200, seed=0)).lower()
    # the wording before the first field of every phrasing, e.g. "Reverse the word", "Spell";
    # one-word stems ("Add", "Say") are ordinary words, so only multi-word stems are checked
    stems = {p.split("{")[0].strip().lower() for f in FAMILIES.values() for p in f.phrasings}
    stems = {s for s in stems if " " in s}
    assert "reverse the word" in stems  # the check below checks something
    for stem in stems:
        assert stem not in text, stem


# ---------------------------------------------------------------- build_world


def all_files(files: WorldFiles):
    return [files.prompts(s) for s in ("sft", "rm", "ppo", "val", "eval")] + [
        files.demonstrations, files.corpus, files.heldout_corpus, files.manifest,
    ]


def read_lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_build_world_writes_every_file(tmp_path):
    config = WorldConfig(**SMALL)
    files = build_world(config, tmp_path / "world")
    for path in all_files(files):
        assert path.is_file(), path
    sizes = split_sizes(config)
    for split in ("sft", "rm", "ppo", "val", "eval"):
        assert len(read_lines(files.prompts(split))) == sizes[split], split
    # 100 corpus documents and 10 held-out ones, one per line
    assert len(read_lines(files.corpus)) == 100
    assert len(read_lines(files.heldout_corpus)) == 10


def test_demonstrations_end_with_an_assistant_turn(tmp_path):
    config = WorldConfig(**SMALL)
    files = build_world(config, tmp_path)
    demos = [json.loads(line) for line in read_lines(files.demonstrations)]
    # one demonstration per SFT prompt
    assert len(demos) == split_sizes(config)["sft"]
    sft_ids = [json.loads(line)["id"] for line in read_lines(files.prompts("sft"))]
    assert [d["id"] for d in demos] == sft_ids
    for demo in demos:
        assert demo["messages"][-1]["role"] == "assistant"
        assert demo["messages"][-2]["role"] == "user"


def test_build_world_twice_does_not_rewrite(tmp_path):
    config = WorldConfig(**SMALL)
    files = build_world(config, tmp_path)
    # set every mtime far in the past, so a rewrite shows however coarse the clock is
    for path in all_files(files):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    build_world(config, tmp_path)
    for path in all_files(files):
        assert path.stat().st_mtime_ns == 1_000_000_000, path


def test_build_world_rewrites_for_another_config_only_when_asked(tmp_path):
    files = build_world(WorldConfig(**SMALL), tmp_path)
    os.utime(files.manifest, ns=(1_000_000_000, 1_000_000_000))
    with pytest.raises(UserError, match=r"holds the world of another config \(world.seed: 0 -> 1\)"):
        build_world(WorldConfig(**{**SMALL, "seed": 1}), tmp_path)  # the run's stages learnt from the old one
    assert files.manifest.stat().st_mtime_ns == 1_000_000_000
    build_world(WorldConfig(**{**SMALL, "seed": 1}), tmp_path, replace=True)
    assert files.manifest.stat().st_mtime_ns != 1_000_000_000
    assert json.loads(files.manifest.read_text())["config"]["seed"] == 1


def test_a_world_of_another_config_names_the_changed_keys_in_the_configs_order(tmp_path):
    # they were listed in the order of a set of their names, another at each start of Python
    build_world(WorldConfig(**SMALL), tmp_path)
    changed = {"seed": 1, "n_prompts": 301, "n_val": 21, "n_eval": 31, "multi_turn_rate": 0.5, "demo_error_rate": 0.5}
    with pytest.raises(UserError) as err:
        build_world(WorldConfig(**{**SMALL, **changed}), tmp_path)
    named = re.search(r"another config \((.*?)\)", str(err.value)).group(1)
    assert [part.split(":")[0] for part in named.split(", ")] == [f"world.{key}" for key in changed]


def test_a_world_whose_record_holds_the_labelers_noise_is_the_same_world(tmp_path):
    # world.json written while labeler_noise was the world's (now collect's): the files never depended on it
    files = build_world(WorldConfig(**SMALL), tmp_path)
    manifest = json.loads(files.manifest.read_text())
    manifest["config"]["labeler_noise"] = 0.5
    files.manifest.write_text(json.dumps(manifest))
    os.utime(files.manifest, ns=(1_000_000_000, 1_000_000_000))
    build_world(WorldConfig(**SMALL), tmp_path)  # neither refused nor rebuilt
    assert files.manifest.stat().st_mtime_ns == 1_000_000_000
    with pytest.raises(UserError, match=r"another config \(world.seed: 0 -> 1\)"):  # what still differs is named alone
        build_world(WorldConfig(**{**SMALL, "seed": 1}), tmp_path)


def test_the_world_command_reports_the_agreement_at_collects_labeler_noise(tmp_path):
    out = " ".join(cli("world", "-c", str(SMOKE), f"run.dir={tmp_path}", "collect.labeler_noise=0").stderr.split())
    assert "two simulated labelers at noise 0.0 agree on 100.0% of" in out  # noise-free labelers always agree


class RecordingProcess:
    """An accelerator's process: whether it is the main one, and a barrier that notes whether the
    world was on disk when this process reached it."""

    def __init__(self, is_main: bool, manifest):
        self.is_main_process, self.manifest, self.world_at_barrier = is_main, manifest, None

    def wait_for_everyone(self):
        self.world_at_barrier = self.manifest.is_file()


def test_build_world_once_is_written_by_the_main_process_before_the_barrier(tmp_path):
    config = WorldConfig(**SMALL)
    other = RecordingProcess(False, WorldFiles(tmp_path / "a").manifest)
    files = build_world_once(config, tmp_path / "a", other)
    assert other.world_at_barrier is False  # another process leaves the writing to the main one
    assert files.manifest.is_file()  # (here no main process wrote it, so it built the world itself after the barrier)
    main = RecordingProcess(True, WorldFiles(tmp_path / "b").manifest)
    files = build_world_once(config, tmp_path / "b", main)
    assert main.world_at_barrier is True
    assert build_world_once(config, tmp_path / "b", main) == files
