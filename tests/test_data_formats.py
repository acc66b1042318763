"""Users' data in the ecosystem's formats: detection, file types, file:line errors, `instructrl
data check`, and SFT / RM / PPO run on each format with no conversion."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from conftest import SMOKE, cli
from tiny_models import NO_SYSTEM_TEMPLATE, WORDS, save_tiny_model, user_data, write_jsonl

from instructrl.config import load_config
from instructrl.data.formats import Demonstration, detect_format
from instructrl.data.inputs import read_comparisons, read_data
from instructrl.data.readers import read_records
from instructrl.errors import UserError
from instructrl.models.base import load_tokenizer
from instructrl.training import progress

USER = {"role": "user", "content": "Say cat."}
ASSISTANT = {"role": "assistant", "content": "cat"}
WRONG = {"role": "assistant", "content": "dog"}

# one record of every format and shape, with the format it must be detected as
SHAPES = {
    "text": ({"text": "the cat sat"}, "text"),
    "prompt_completion": ({"prompt": "Say cat.", "completion": "cat"}, "prompt_completion"),
    "prompt_completion_conversational": ({"prompt": [USER], "completion": [ASSISTANT]}, "prompt_completion"),
    "messages": ({"messages": [USER, ASSISTANT]}, "messages"),
    "preference_explicit": ({"prompt": "Say cat.", "chosen": "cat", "rejected": "dog"}, "preference"),
    "preference_explicit_conversational": ({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [WRONG]}, "preference"),
    "preference_implicit": ({"chosen": "Say cat. cat", "rejected": "Say cat. dog"}, "preference"),
    "preference_implicit_conversational": ({"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}, "preference"),
    "comparison": ({"id": "p1", "prompt": [USER], "responses": ["cat", "dog", "fox"], "ranks": [0, 1, 2], "labeler_id": "me"}, "comparison"),
    "prompt": ({"prompt": "Say cat."}, "prompt"),
    "prompt_messages": ({"messages": [USER]}, "prompt"),
    "unpaired_preference": ({"prompt": "Say cat.", "completion": "dog", "label": False}, "unpaired_preference"),
    "stepwise_supervision": ({"prompt": "Say cat.", "completions": ["I say", "dog"], "labels": [True, False]}, "stepwise_supervision"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_detect_format(shape):
    record, fmt = SHAPES[shape]
    assert detect_format(record) == fmt


def test_each_format_converts_for_its_stage(tmp_path):
    def read(shape, use):
        return read_data(write_jsonl(tmp_path / f"{shape}.jsonl", [SHAPES[shape][0]]), use)[1][0]

    assert read("text", "demonstration") == Demonstration(text="the cat sat")
    for shape in ("prompt_completion", "prompt_completion_conversational", "messages"):
        assert read(shape, "demonstration") == Demonstration(messages=[USER, ASSISTANT])
    for shape in ("preference_explicit", "preference_explicit_conversational", "preference_implicit_conversational"):
        comparison = read(shape, "comparison")
        assert comparison.responses == ["cat", "dog"] and comparison.ranks == [0, 1]
        assert [m.model_dump() for m in comparison.prompt] == [USER]
    assert read("comparison", "comparison").ranks == [0, 1, 2]
    # a K-way record's text prompt is one user turn, as in every other format (it was refused: "prompt: Input should be a valid list")
    text_prompt = write_jsonl(tmp_path / "text_prompt.jsonl", [SHAPES["comparison"][0] | {"prompt": "Say cat."}])
    assert read_data(text_prompt, "comparison")[1][0] == read("comparison", "comparison")
    # PPO takes the prompt of any record that holds one
    for shape in ("prompt", "prompt_messages", "prompt_completion", "messages", "preference_explicit", "comparison",
                  "unpaired_preference", "stepwise_supervision"):
        assert read(shape, "prompt").messages == [USER], shape


def test_a_preference_record_whose_sides_repeat_the_prompt_reads_as_the_same_pair(tmp_path):
    """HF's ultrafeedback_binarized writes the prompt's text beside two whole conversations (TRL reads the
    turns they share as the prompt): it was refused ("must each hold one assistant turn after the prompt"),
    as was a conversational prompt that each side repeats; its 'prompt_id' is no misspelt 'prompt'."""
    ultrafeedback = {"prompt": "Say cat.", "prompt_id": "0f3a", "chosen": [USER, ASSISTANT], "rejected": [USER, WRONG],
                     "messages": [USER, ASSISTANT], "score_chosen": 8.0, "score_rejected": 2.0}
    repeated = {"prompt": [USER], "chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}
    path = write_jsonl(tmp_path / "prefs.jsonl", [ultrafeedback, repeated, SHAPES["preference_explicit_conversational"][0]])
    first, second, expected = read_comparisons(path)
    assert (first.prompt, first.responses) == (second.prompt, second.responses) == (expected.prompt, expected.responses)
    assert "misspelt_fields" not in json.loads(cli("data", "check", str(path)).stdout.splitlines()[-1])


@pytest.mark.parametrize("record", [{"prompt": ""}, {"prompt": " "}, {"messages": [{"role": "user", "content": ""}]},
                                    {"prompt": "", "chosen": "cat", "rejected": "dog"}, {"prompt": [{"role": "user", "content": " "}], "chosen": [ASSISTANT], "rejected": [WRONG]},
                                    SHAPES["comparison"][0] | {"prompt": ""}])
def test_an_empty_prompt_is_named(tmp_path, record):
    """PPO rolled out on a blank prompt (an empty CSV cell), and an empty text 'prompt' of a pair was
    told that 'chosen' and 'rejected' share no prompt, to give one as 'prompt'."""
    use, shape = ("comparison", "preference_explicit") if "chosen" in record or "ranks" in record else ("prompt", "prompt")
    path = write_jsonl(tmp_path / "data.jsonl", [SHAPES[shape][0], record])
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: the prompt is empty$"):
        read_data(path, use)


@pytest.mark.parametrize("shape", ["unpaired_preference", "stepwise_supervision"])
def test_labelled_completions_are_neither_demonstrations_nor_rankings(tmp_path, shape):
    """TRL's KTO data (a completion labelled good or bad) was read as prompt/completion, and SFT learnt
    the completions labelled false; TRL's stepwise data was a prompt whose 'completions' looked misspelt."""
    path = write_jsonl(tmp_path / f"{shape}.jsonl", [SHAPES[shape][0]] * 2)
    for use, key in (("demonstration", "sft.data"), ("comparison", "rm.data")):
        with pytest.raises(UserError, match=re.escape(f"{path}:1: {'an' if shape[0] == 'u' else 'a'} {shape} record (fields: {', '.join(sorted(SHAPES[shape][0]))}) cannot be used as {key}")):
            read_data(path, use)
    summary = json.loads(cli("data", "check", str(path)).stdout.splitlines()[-1])
    assert (summary["format"], summary["usable_as"]) == (shape, ["ppo.prompts"]) and "misspelt_fields" not in summary


def test_parquet_json_and_datasets_folder_read_like_jsonl(tmp_path):
    from datasets import Dataset

    rows = [{**SHAPES["preference_explicit_conversational"][0], "id": name} for name in ("first", "second")]
    jsonl = write_jsonl(tmp_path / "prefs.jsonl", rows)
    (tmp_path / "prefs.json").write_text(json.dumps(rows, indent=1))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "prefs.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "prefs_dataset"))
    expected = read_comparisons(jsonl)
    assert expected[1].id == "second"
    for other in ("prefs.json", "prefs.parquet", "prefs_dataset"):
        assert read_comparisons(tmp_path / other) == expected, other


@pytest.mark.parametrize("lines, needle", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"colour": "red"}'], "bad.jsonl:2: fits no known format (fields: colour)"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"}'], "bad.jsonl:2: a preference record needs 'rejected'"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"'], "bad.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"text": "a"}'], "bad.jsonl:2: a text record (fields: text) cannot be used as rm.data"),
    # a misspelt field makes the record look like another format: the message says which field was probably meant
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b", "rejeted": "c"}'],
     "bad.jsonl:2: a preference record needs 'rejected' (fields: chosen, prompt, rejeted; did you mean 'rejected' for 'rejeted'?)"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '', '{"prompt": "a", "chosen": ["b"], "rejected": "c"}'], "bad.jsonl:3: 'chosen' and 'rejected' must both be text"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, lines, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=re.escape(needle)):
        read_comparisons(path)


def test_bad_rows_of_a_parquet_file_are_named_by_row(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "Say cat.", "completion": "cat"}, {"prompt": "Say dog.", "completion": ""}]).to_parquet(str(tmp_path / "p.parquet"))
    assert [m for _, m in read_records(tmp_path / "p.parquet")][1] == {"prompt": "Say dog.", "completion": ""}
    with pytest.raises(UserError, match=r"p.parquet: row 1: a prompt_completion record \(fields: completion, prompt\) cannot be used as rm.data"):
        read_comparisons(tmp_path / "p.parquet")


def test_a_csv_file_reads_as_records_of_text_cells(tmp_path):
    """A CSV's header names the fields; cells stay text as written (not 42, a null, or a missing field),
    where it was once read as plain text, its header a document of PPO-ptx's."""
    path = tmp_path / "demos.csv"
    path.write_text('prompt,completion\n"Say cat, please.",cat\nWhat is 6*7?,42\nSay NA.,NA\nSay nothing.,\n')
    assert [record for _, record in read_records(path)][1:] == [
        {"prompt": "What is 6*7?", "completion": "42"}, {"prompt": "Say NA.", "completion": "NA"}, {"prompt": "Say nothing.", "completion": ""}]
    assert read_data(path, "demonstration")[1][0].messages == [{"role": "user", "content": "Say cat, please."}, {"role": "assistant", "content": "cat"}]
    summary = json.loads(cli("data", "check", str(path)).stdout.splitlines()[-1])
    assert summary["format"] == "prompt_completion" and summary["records"] == 4
    assert read_data(write_csv(tmp_path / "text.csv", "text\none document\n"), "text")[1] == ["one document"]
    with pytest.raises(UserError, match=re.escape("short.csv:3: 1 cells, but the header (prompt, completion) names 2")):
        read_data(write_csv(tmp_path / "short.csv", "prompt,completion\na,b\nc\n"), "demonstration")
    with pytest.raises(UserError, match=re.escape("long.csv:2: 3 cells, but the header (prompt, completion) names 2")):
        read_data(write_csv(tmp_path / "long.csv", "prompt,completion\na,b,c\n"), "demonstration")
    with pytest.raises(UserError, match=re.escape("prefs.csv:2: a prompt_completion record (fields: completion, prompt) cannot be used as rm.data")):
        read_comparisons(write_csv(tmp_path / "prefs.csv", "prompt,completion\na,b\n"))


def test_a_byte_order_mark_and_windows_line_ends_are_not_part_of_the_data(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors begin a file with a byte-order mark and end lines with CRLF:
    the mark was read into the CSV header's first field ('\\ufeffprompt': "needs 'prompt'"), failed a JSON
    file ("expected a JSON object, found list") and began PPO-ptx's first document."""
    from instructrl.data.inputs import read_texts

    bom = "\ufeff"
    (tmp_path / "demos.csv").write_text(bom + "prompt,completion\r\nSay cat.,cat\r\n", newline="")
    assert read_data(tmp_path / "demos.csv", "demonstration")[1][0].messages == [USER, ASSISTANT]
    for name, text in (("list.json", json.dumps([SHAPES["messages"][0]] * 2)), ("pretty.json", json.dumps([SHAPES["messages"][0]] * 2, indent=2)),
                       ("one.json", json.dumps(SHAPES["messages"][0], indent=2)), ("lines.jsonl", json.dumps(SHAPES["messages"][0]) + "\r\n")):
        (tmp_path / name).write_text(bom + text.replace("\n", "\r\n"), newline="")
        assert {d.messages[-1]["content"] for d in read_data(tmp_path / name, "demonstration")[1]} == {"cat"}, name
    (tmp_path / "text.txt").write_text(bom + "first document\r\nsecond\r\n", newline="")
    assert read_texts(tmp_path / "text.txt") == ["first document", "second"]


@pytest.mark.parametrize("name, text, needle", [
    ("demos.jsonl", '{"text": "the cat \\ud800"}\n', "demos.jsonl:1: 'text' holds a character that is not valid Unicode ('\\ud800' at 8)"),
    ("prefs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "b"}\n{"prompt": "a", "chosen": "b", "rejected": "\\udc00"}\n', "prefs.jsonl:2: 'rejected' holds"),
    ("ranked.json", json.dumps([{**SHAPES["comparison"][0], "responses": ["cat", "dog\ud800", "fox"]}]), "ranked.json: record 1: 'responses[1]' holds"),
])
def test_text_that_is_not_valid_unicode_is_named_by_file_line_and_field(tmp_path, name, text, needle):
    """JSON's "\\ud800" escape reads as a lone surrogate, which no tokenizer takes: sft on such a text record
    ended in the tokenizer's TypeError. A surrogate pair (an emoji written as two escapes) is valid text."""
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=re.escape(needle)):
        list(read_records(tmp_path / name))
    (tmp_path / "emoji.jsonl").write_text('{"text": "a cat \\ud83d\\ude00"}\n')
    assert [record for _, record in read_records(tmp_path / "emoji.jsonl")] == [{"text": "a cat \U0001f600"}]


def test_a_field_of_the_wrong_type_is_named_with_what_it_may_be(tmp_path):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "Say cat.", "completion": "cat"}, {"prompt": "Say dog.", "completion": 3}])
    with pytest.raises(UserError, match=re.escape("demos.jsonl:2: 'completion' must be text or a list of {'role', 'content'} messages, not int")):
        read_data(path, "demonstration")


def test_a_hub_dataset_name_is_told_that_data_is_read_from_local_files(tmp_path):
    with pytest.raises(UserError, match=r"trl-lib/Capybara: file not found; data is read from local files only: save a Hub dataset first"):
        read_data("trl-lib/Capybara", "demonstration")
    with pytest.raises(UserError, match=r"missing.jsonl: file not found$"):
        read_data(tmp_path / "missing.jsonl", "demonstration")


def test_a_conversation_the_chat_template_refuses_is_named_by_file_and_line(tmp_path):
    """A Gemma-like template raises on a system turn: each stage names the record instead of a traceback."""
    from instructrl.stages.ppo import run_ppo
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import load_demonstrations

    model = save_tiny_model("qwen2", tmp_path / "model")
    tokenizer = load_tokenizer(model)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    tokenizer.save_pretrained(model)
    system = {"role": "system", "content": "Be brief."}
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"messages": [USER, ASSISTANT]}, {"messages": [system, USER, ASSISTANT]}])
    refused = "the model's chat template refuses this conversation (System role not supported)"
    with pytest.raises(UserError, match=re.escape(f"demos.jsonl:2: {refused}")):
        load_demonstrations(demos, tokenizer, 128)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [WRONG]}] * 40
                        + [{"prompt": [system, USER], "chosen": [ASSISTANT], "rejected": [WRONG]}])
    with pytest.raises(UserError, match=re.escape(f"prefs.jsonl: comparison 'prefs.jsonl:41': {refused}")):
        run_rm(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"rm.model={model}", f"rm.data={prefs}"]), log=lambda *_: None)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [USER]}, {"prompt": [system, USER]}])
    with pytest.raises(UserError, match=re.escape(f"prompts.jsonl: prompt 'prompts.jsonl:2': {refused}")):
        run_ppo(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"ppo.policy={model}", f"ppo.reward_model={model}", f"ppo.prompts={prompts}",
                                  "ppo.ptx_coef=0"]),
                log=lambda *_: None)


# OpenAI's chat fine-tuning records: content parts, the developer role, a participant's name, weights, tools
PARTS = {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}
SYSTEM = {"role": "system", "content": "Be brief."}
CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": "call00001", "type": "function",
                                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call00001", "content": "sunny"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
OPENAI = {"messages": [PARTS, {**USER, "name": "ann"}, {**WRONG, "weight": 0}, USER, {**ASSISTANT, "weight": 1}], "parallel_tool_calls": False}
TOOL_RECORD = {"messages": [USER, CALL, RESULT, ASSISTANT], "tools": TOOLS}


def test_openai_fine_tuning_records_read_as_demonstrations(tmp_path):
    """A 'weight' or 'name' was refused as an unknown field, content parts as no string, 'developer' as no role."""
    data = write_jsonl(tmp_path / "openai.jsonl", [OPENAI, TOOL_RECORD])
    formats, (weighted, tools), _ = read_data(data, "demonstration")
    assert formats == ["messages"]
    assert weighted.messages == [SYSTEM, {**USER, "name": "ann"}, {**WRONG, "weight": 0}, USER, {**ASSISTANT, "weight": 1}]
    assert tools.messages == [USER, {**CALL, "content": ""}, RESULT, ASSISTANT] and tools.tools == TOOLS
    # datasets store the tools as JSON text (their schemas differ) and drop null content: read alike
    from datasets import Dataset

    Dataset.from_list([{**TOOL_RECORD, "tools": json.dumps(TOOLS)}]).to_parquet(str(tmp_path / "tools.parquet"))
    assert read_data(tmp_path / "tools.parquet", "demonstration")[1][0] == tools


@pytest.mark.parametrize("messages, needle", [
    ([USER, {**ASSISTANT, "weight": 0}], "data.jsonl:2: every assistant turn has weight 0: nothing to learn"),
    ([USER, {**ASSISTANT, "weight": 2}], "data.jsonl:2: messages[1].weight must be 0 (the turn is context, not learnt) or 1, got 2"),
    ([USER, {**ASSISTANT, "weight": True}], "data.jsonl:2: messages[1].weight must be 0 (the turn is context, not learnt) or 1, got True"),
    ([{**USER, "weight": 1}, ASSISTANT], "data.jsonl:2: messages[0]: a message of role user has no field 'weight' (it may hold role, content, name)"),
    ([{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]}, ASSISTANT],
     "data.jsonl:2: messages[0].content: part 1 is of type 'image_url'; only text parts are supported"),
    ([USER, {**ASSISTANT, "refusal": None, "audio": {"id": "a"}}], "data.jsonl:2: messages[1]: a message of role assistant has no field 'audio' (it may hold role, content, name, weight, tool_calls)"),
    ([USER, {"role": "assistant"}], "data.jsonl:2: messages[1].content is missing: only an assistant turn that calls tools may have none"),
    ([USER, {**CALL, "tool_calls": [{"name": "f"}]}, ASSISTANT], "data.jsonl:2: messages[1].tool_calls must be a non-empty list of"),
])
def test_a_bad_openai_message_is_named_by_file_line_and_field(tmp_path, messages, needle):
    path = write_jsonl(tmp_path / "data.jsonl", [SHAPES["messages"][0], {"messages": messages}])
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / needle))}"):
        read_data(path, "demonstration")


def test_messages_are_read_alike_in_prompts_and_comparisons(tmp_path):
    """One reading of messages for every input: content parts and the developer role in a PPO prompt,
    a comparison's and a preference pair's prompt (a comparison's refused them: 'prompt.0.role');
    tool turns only where they are learnt, in demonstrations, not silently dropped elsewhere."""
    plain = [SYSTEM, USER]
    openai = [PARTS, {**USER, "name": "ann"}]
    assert read_data(write_jsonl(tmp_path / "p.jsonl", [{"messages": openai}]), "prompt")[1][0].messages == plain
    comparison = SHAPES["comparison"][0] | {"prompt": openai}
    pair = SHAPES["preference_explicit_conversational"][0] | {"prompt": openai}
    for record in (comparison, pair):
        assert [m.model_dump() for m in read_comparisons(write_jsonl(tmp_path / "c.jsonl", [record]))[0].prompt] == plain
    tool_prompt = {"messages": [USER, CALL, RESULT, {"role": "user", "content": "And in Rome?"}]}
    for record, use, needle in [(tool_prompt, "prompt", "p.jsonl:1: messages[1]: tool calls and tool results are read in demonstrations (sft.data) only"),
                                ({"messages": [USER], "tools": TOOLS}, "prompt", "p.jsonl:1: 'tools' (tool definitions) are read in demonstrations"),
                                (pair | {"tools": TOOLS}, "comparison", "p.jsonl:1: 'tools' (tool definitions) are read in demonstrations")]:
        with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / needle))}"):
            read_data(write_jsonl(tmp_path / "p.jsonl", [record]), use)


def test_a_prompt_completion_record_learns_the_completion_not_the_prompts_answers(tmp_path):
    """The answers inside a conversational prompt were learnt as the completion is (' no<|endoftext|> cat<|endoftext|>')."""
    from instructrl.stages.sft import load_demonstrations

    tokenizer = load_tokenizer(save_tiny_model("llama", tmp_path / "model"))
    record = {"prompt": [{"role": "user", "content": "Say no."}, {"role": "assistant", "content": "no"}, USER], "completion": [ASSISTANT]}
    [example] = load_demonstrations(write_jsonl(tmp_path / "pc.jsonl", [record]), tokenizer, 128)[0]
    assert tokenizer.decode([t for t, m in zip(example.input_ids, example.assistant_mask) if m]) == " cat<|endoftext|>"


def test_data_check_counts_weight_0_and_tool_turns(tmp_path):
    empty_context = {"messages": [USER, {"role": "assistant", "content": "", "weight": 0}, USER, ASSISTANT]}
    data = write_jsonl(tmp_path / "openai.jsonl", [OPENAI, TOOL_RECORD, empty_context])
    summary = json.loads(cli("data", "check", str(data)).stdout.splitlines()[-1])
    assert (summary["format"], summary["usable_as"]) == ("messages", ["sft.data", "rm.demonstrations"])
    assert (summary["assistant_turns"], summary["weight_0_turns"], summary["tool_turns"]) == (6, 2, 2)
    assert summary["not_usable_as"]["ppo.prompts"].startswith(f"{data}:2: 'tools' (tool definitions) are read in demonstrations (sft.data) only")
    assert "empty_answers" not in summary  # a turn of calls alone, or one not learnt, is no empty answer


def test_sft_learns_tool_calls_under_a_template_that_renders_them_and_refuses_one_that_drops_them(tmp_path):
    from tiny_models import TOOL_TEMPLATE

    from instructrl.stages.sft import load_demonstrations, run_sft

    model = save_tiny_model("qwen2", tmp_path / "model")
    data = write_jsonl(tmp_path / "tools.jsonl", [OPENAI, TOOL_RECORD])
    refusal = f"{data}:2: the model's chat template does not render tool definitions and calls (it would drop them)"
    with pytest.raises(UserError, match=f"^{re.escape(refusal)}"):
        load_demonstrations(data, load_tokenizer(save_tiny_model("llama", tmp_path / "llama")), 1024)  # the fallback template
    tokenizer = load_tokenizer(model)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(model)
    weighted, tools = load_demonstrations(data, tokenizer, 1024)[0]
    assert tokenizer.decode(tools.input_ids).startswith('[tools]{"type": "function", "function": {"name": "get_weather"')
    learnt = [tokenizer.decode([t for t, m in zip(e.input_ids, e.assistant_mask) if m]) for e in (weighted, tools)]
    assert learnt == ["cat<|endoftext|>", '<call>get_weather {"city": "Paris"}</call><|endoftext|>cat<|endoftext|>']
    # the stage, on records that fit the tiny model's 128-token context (tool definitions alone fill it)
    data = write_jsonl(tmp_path / "short.jsonl", [OPENAI, {"messages": TOOL_RECORD["messages"]}] * 8)
    said = []
    run_sft(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"sft.model={model}", f"sft.data={data}"]), log=said.append)
    assert any(line.startswith(f"sft: 16 demonstrations from {data}, ") for line in said) and (tmp_path / "run" / "sft" / "final").is_dir()


def write_csv(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, n", [
    ('{\n  "prompt": "Say cat.",\n  "completion": "cat"\n}\n', 1),  # one record, pretty-printed
    ('{"data": [{"prompt": "Say cat.", "completion": "cat"}, {"prompt": "Say dog.", "completion": "dog"}]}', 2),  # wrapped in a field
    ('{"prompt": "Say cat.", "completion": "cat"}\n{"prompt": "Say dog.", "completion": "dog"}\n', 2),  # JSON lines named .json
    ('{"messages": [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"}]}', 1),  # one record, not a wrapper
])
def test_every_shape_of_a_json_file_reads(tmp_path, text, n):
    path = tmp_path / "data.json"
    path.write_text(text)
    assert len(read_data(path, "demonstration")[1]) == n


def test_data_check_cli(tmp_path):
    good = write_jsonl(tmp_path / "prefs.jsonl", [SHAPES["preference_implicit"][0]] * 3)
    out = cli("data", "check", str(good))
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["format"] == "preference" and summary["records"] == 3 and summary["k"] == [2]
    assert summary["usable_as"] == ["rm.data", "ppo.prompts"] and summary["style"] == "plain text, implicit prompt"
    # K-way rankings: a tie is no pair to learn from, and is counted apart
    tied = SHAPES["comparison"][0] | {"ranks": [0, 0, 1]}
    summary = json.loads(cli("data", "check", str(write_jsonl(tmp_path / "c.jsonl", [SHAPES["comparison"][0], tied]))).stdout.splitlines()[-1])
    assert (summary["k"], summary["pairs"], summary["tied_pairs"]) == ([3], 3 + 2, 1)
    demos = json.loads(cli("data", "check", str(write_jsonl(tmp_path / "d.jsonl", [SHAPES["messages"][0]] * 2))).stdout.splitlines()[-1])
    assert demos["usable_as"] == ["sft.data", "rm.demonstrations", "ppo.prompts"] and demos["assistant_turns"] == 2
    assert "empty_answers" not in demos
    empty = write_jsonl(tmp_path / "e.jsonl", [SHAPES["messages"][0], {"prompt": "Say nothing.", "completion": ""}])
    assert json.loads(cli("data", "check", str(empty)).stdout.splitlines()[-1])["empty_answers"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SHAPES["messages"][0]) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    proc = cli("data", "check", str(bad), check=False)
    assert proc.returncode == 2 and "bad.jsonl:2: messages[0] must be" in proc.stderr
    # a misspelt field that still fits another format is pointed out, with its line
    typo = write_jsonl(tmp_path / "typo.jsonl", [{"prompt": "Say cat.", "completion": "cat"}, {"prompt": "Say dog.", "completon": "dog"}])
    summary = json.loads(cli("data", "check", str(typo)).stdout.splitlines()[-1])
    assert summary["usable_as"] == ["ppo.prompts"] and summary["misspelt_fields"] == {"completon": f"{typo}:2: did you mean 'completion'?"}
    # plain text is PPO-ptx's pretraining text, one document per line
    text = tmp_path / "ptx.txt"
    text.write_text("one document\n\nanother document\n")
    summary = json.loads(cli("data", "check", str(text)).stdout.splitlines()[-1])
    assert summary == {"file": str(text), "format": "plain text", "records": 2, "usable_as": ["ppo.ptx_data"]}


def test_data_check_says_what_each_input_would_say_of_the_file(tmp_path):
    """data check validates every record for every input in one pass: a file an input takes is usable as
    it even where another input refuses a record (a conversation that opens with the assistant is a
    demonstration, but no PPO prompt: data check refused the whole file, which SFT trains on), and an
    input that took some records says which record it stopped at (a conversation with no answer among
    demonstrations left the file 'usable as ppo.prompts', with no word of why not as sft.data)."""
    from instructrl.stages.sft import load_demonstrations

    greeting = {"messages": [{"role": "system", "content": "Greet."}, {"role": "assistant", "content": "hello"}]}
    demos = write_jsonl(tmp_path / "demos.jsonl", [SHAPES["messages"][0], greeting])
    assert len(load_demonstrations(demos, load_tokenizer(save_tiny_model("llama", tmp_path / "llama")), 128)[0]) == 2
    summary = json.loads(cli("data", "check", str(demos)).stdout.splitlines()[-1])
    assert summary["usable_as"] == ["sft.data", "rm.demonstrations"]
    assert summary["not_usable_as"] == {"ppo.prompts": f"{demos}:2: the last message of a prompt must be the user's"}

    unanswered = write_jsonl(tmp_path / "unanswered.jsonl", [SHAPES["messages"][0], SHAPES["prompt_messages"][0]])
    proc = cli("data", "check", str(unanswered))
    refusal = f"{unanswered}:2: a prompt record (fields: messages; its last message is the user's, with no answer after it) cannot be used as sft.data"
    assert json.loads(proc.stdout.splitlines()[-1])["not_usable_as"]["sft.data"].startswith(refusal)
    assert f"not usable as sft.data: {refusal}" in proc.stderr
    # an input refused at the first record, for its format, is no input the file was meant for: not listed
    assert "not_usable_as" not in json.loads(cli("data", "check", str(write_jsonl(tmp_path / "p.jsonl", [SHAPES["prompt"][0]]))).stdout.splitlines()[-1])
    # no input takes the file: the error is that of the input that read furthest
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [SHAPES["preference_explicit"][0], SHAPES["text"][0]])
    proc = cli("data", "check", str(mixed), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {mixed}:2: a text record (fields: text) cannot be used as rm.data, which takes comparison, preference records"


def test_a_file_of_the_wrong_kind_is_refused_as_the_input_it_was_given_as(tmp_path):
    """Prompts and rankings are read by more than one input: the error names the one the user set
    (eval.prompts=demos.txt said 'cannot be used as ppo.prompts', collect.judgements 'as rm.data')."""
    from instructrl.evaluation.evaluate import _eval_prompts

    texts = write_jsonl(tmp_path / "texts.jsonl", [SHAPES["text"][0]])
    config = load_config(overrides=[f"run.dir={tmp_path / 'run'}", f"eval.prompts={texts}", "eval.reward_model=rm"])
    with pytest.raises(UserError, match=f"^{re.escape(str(texts))}:1: a text record \\(fields: text\\) cannot be used as eval.prompts, "):
        _eval_prompts(config, print)
    demos = write_jsonl(tmp_path / "demos.jsonl", [SHAPES["messages"][0]])
    proc = cli("collect", f"run.dir={tmp_path / 'run'}", f"collect.judgements={demos}", check=False)
    assert proc.returncode == 2 and f"{demos}:1: a messages record (fields: messages) cannot be used as collect.judgements," in proc.stderr
    proc = cli("label", "project", "p", "-d", str(tmp_path / "label"), "--prompts", str(texts), "--write", check=False)
    assert proc.returncode == 2 and f"{texts}:1: a text record (fields: text) cannot be used as --prompts," in proc.stderr
    # where no input is named, the stage's own
    with pytest.raises(UserError, match="cannot be used as ppo.prompts,"):
        read_data(texts, "prompt")


def test_data_check_reads_a_file_once_keeping_no_record_and_tells_its_progress(tmp_path, monkeypatch):
    """A large file is checked in one pass in constant memory (it was read once per input and once
    per summary figure, every record of each input kept: 2.1 GB and 62 s for a 200 MB JSONL), with
    a count of the records read so far and, where quick to know, their total."""
    from datasets import Dataset

    from instructrl.data import check
    from instructrl.data.readers import count_records

    rows = [SHAPES["messages"][0]] * 2500
    path = write_jsonl(tmp_path / "demos.jsonl", rows)
    path.write_text(path.read_text().replace("\n", "\n\n", 3))  # blank lines are no records
    reads, told = [], []
    monkeypatch.setattr(check, "read_records", lambda *args: reads.append(args) or read_records(*args))
    summary = check.check_file(path, progress=told.append)
    assert (len(reads), summary["records"], told) == (1, 2500, [1000, 2000])
    assert count_records(path) == 2500
    Dataset.from_list(rows[:30]).to_parquet(str(tmp_path / "demos.parquet"))
    Dataset.from_list(rows[:1030]).save_to_disk(str(tmp_path / "demos_dataset"))  # more than one batch of rows
    assert (count_records(tmp_path / "demos.parquet"), count_records(tmp_path / "demos_dataset")) == (30, 1030)
    assert list(read_records(tmp_path / "demos_dataset")) == [(f"{tmp_path / 'demos_dataset'}: row {n}", rows[0]) for n in range(1, 1031)]
    assert count_records(tmp_path / "missing.jsonl") is None  # the check itself says it is missing


def test_a_file_that_is_no_parquet_is_one_line(tmp_path):
    """The reader's own log line ('Failed to read schema ...') came before ours."""
    (tmp_path / "empty.parquet").write_bytes(b"")
    proc = cli("data", "check", str(tmp_path / "empty.parquet"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'empty.parquet'}: not a readable Parquet file (Parquet file size is 0 bytes)"]


# SFT, RM and PPO on a user's files in each format, on a tiny Llama with no PAD and no chat template
SFT_SHAPES = ["text", "prompt_completion", "prompt_completion_conversational", "messages"]
RM_SHAPES = ["preference_explicit", "preference_explicit_conversational", "preference_implicit", "preference_implicit_conversational", "comparison"]
PPO_SHAPES = ["prompt", "prompt_messages", "prompt_completion"]


def _records(shape: str, n: int = 16) -> list[dict]:
    """n records of ``shape`` about different words (a pair's wrong answer stays another word: the same one would be a tie)."""
    record = json.dumps(SHAPES[shape][0]).replace("dog", "WRONG")
    return [json.loads(record.replace("cat", w).replace("WRONG", "cat" if w == "dog" else "dog").replace("p1", f"p{i}"))
            for i, w in enumerate(WORDS * (n // len(WORDS)))]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A tiny Llama fine-tuned on messages, and a reward model on preferences: the fixed inputs of the other stages."""
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import run_sft

    root = tmp_path_factory.mktemp("formats")
    data = user_data(root / "data")
    config = load_config(SMOKE, [f"run.dir={root / 'run'}", f"sft.model={save_tiny_model('llama', root / 'llama')}", f"sft.data={data['sft']}",
                                 f"rm.model={root / 'run' / 'sft' / 'final'}", f"rm.data={data['rm']}", f"rm.demonstrations={data['sft']}"])
    run_sft(config, log=lambda *_: None)
    run_rm(config, log=lambda *_: None)
    return root / "run", data


@pytest.mark.parametrize("shape", SFT_SHAPES)
def test_sft_on_each_format(tmp_path, tiny_sft, shape):
    from instructrl.stages.sft import run_sft

    run, _ = tiny_sft
    data = write_jsonl(tmp_path / f"{shape}.jsonl", _records(shape))
    run_sft(load_config(SMOKE, [f"run.dir={tmp_path}", f"sft.model={run / 'sft' / 'final'}", f"sft.data={data}"]), log=lambda *_: None)
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 1 and losses[0] > 0


@pytest.mark.parametrize("shape", RM_SHAPES)
def test_rm_on_each_format(tmp_path, tiny_sft, shape):
    from instructrl.stages.rm import run_rm

    from instructrl.models.base import load_tokenizer
    from instructrl.models.reward import RewardModel, score_sequences
    from instructrl.stages.rm import best_ranked, encode_comparison

    run, _ = tiny_sft
    prefs = write_jsonl(tmp_path / f"{shape}.jsonl", _records(shape))
    run_rm(load_config(SMOKE, [f"run.dir={tmp_path}", f"rm.model={run / 'sft' / 'final'}", f"rm.data={prefs}", "rm.heldout_fraction=0"]),
           log=lambda *_: None)
    # without rm.demonstrations the user's own best-ranked responses average a reward of 0, and the built-in world stays out of it
    final = tmp_path / "rm" / "final"
    model, tokenizer, records = RewardModel.from_pretrained(final), load_tokenizer(final), read_comparisons(prefs)
    chosen = best_ranked(records, [encode_comparison(tokenizer, r) for r in records])
    assert len(chosen) == len(records) and float(model.reward_bias) != 0
    assert abs(sum(score_sequences(model, chosen, tokenizer.pad_token_id, "cpu")) / len(chosen)) < 1e-4
    assert not (tmp_path / "world").exists()


def test_rm_refuses_comparisons_that_are_all_ties(tmp_path, tiny_sft):
    """A pair with the same answer on both sides is a tie, which the ranking loss leaves out: with only
    ties the RM trained on nothing and was saved, exit status 0 (held-out accuracy nan)."""
    from instructrl.stages.rm import run_rm

    run, _ = tiny_sft
    ties = write_jsonl(tmp_path / "ties.jsonl", [{"prompt": f"Say {w}.", "chosen": w, "rejected": w} for w in WORDS * 4])
    refusal = f"{ties}: every training comparison ranks all its responses equal: no pair to learn from"
    with pytest.raises(UserError, match=f"^{re.escape(refusal)}$"):
        run_rm(load_config(SMOKE, [f"run.dir={tmp_path}", f"rm.model={run / 'sft' / 'final'}", f"rm.data={ties}"]), log=lambda *_: None)
    assert not (tmp_path / "rm").exists()
    summary = json.loads(cli("data", "check", str(ties)).stdout.splitlines()[-1])
    assert summary["usable_as"] == ["ppo.prompts"] and summary["not_usable_as"]["rm.data"].endswith("no pair to learn from")
    assert (summary["pairs"], summary["tied_pairs"]) == (0, len(WORDS) * 4)


@pytest.mark.parametrize("shape", PPO_SHAPES)
def test_ppo_on_each_prompt_format(tmp_path, tiny_sft, shape):
    from instructrl.stages.ppo import run_ppo

    run, data = tiny_sft
    prompts = write_jsonl(tmp_path / f"{shape}.jsonl", _records(shape))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(WORDS * 4)}] * 16)  # PPO-ptx's text as records too
    run_ppo(load_config(SMOKE, [f"run.dir={tmp_path}", f"ppo.policy={run / 'sft' / 'final'}", f"ppo.reward_model={run / 'rm' / 'final'}",
                                f"ppo.prompts={prompts}", f"ppo.ptx_data={text}", "ppo.episodes=16"]), log=lambda *_: None)
    [metrics] = [json.loads(line) for line in (tmp_path / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["rollout/length"] >= 1 and "ppo/ptx_loss" in metrics


def test_ppo_on_own_prompts_keeps_the_built_in_world_out(tmp_path, tiny_sft):
    from instructrl.stages.ppo import run_ppo

    run, data = tiny_sft
    own = [f"run.dir={tmp_path}", f"ppo.policy={run / 'sft' / 'final'}", f"ppo.reward_model={run / 'rm' / 'final'}",
           f"ppo.prompts={data['prompts']}", "ppo.episodes=16"]
    # PPO-ptx with the user's prompts needs the user's pretraining text, not the toy world's corpus
    with pytest.raises(UserError, match="ppo.ptx_data=FILE"):
        run_ppo(load_config(SMOKE, own), log=lambda *_: None)
    # too few prompts: the message says how many there are (and how many fit, when some do not) and what to change
    few = own + ["ppo.ptx_coef=0", "ppo.rollout_batch_size=64", "ppo.episodes=64"]
    with pytest.raises(UserError, match=rf"ppo: {data['prompts']} has 32 prompts, fewer than one rollout batch \(ppo.rollout_batch_size = 64\); "
                                        r"add prompts or lower ppo.rollout_batch_size$"):
        run_ppo(load_config(SMOKE, few), log=lambda *_: None)
    with pytest.raises(UserError, match=r"has 0 of its 32 prompts that fit in 128 tokens with the response \(ppo.max_new_tokens = 127\), "
                                        r"fewer than one rollout batch .* or ppo.max_new_tokens$"):
        run_ppo(load_config(SMOKE, few + ["ppo.max_new_tokens=127"]), log=lambda *_: None)
    # too little of it: the message says how much there is and what to change (blocks of the model's 128-token context)
    short = tmp_path / "short.txt"
    short.write_text("the cat and the dog\n")
    with pytest.raises(UserError, match=r"short.txt: too little text for ppo.ptx_batch_size = \d+ blocks of 128 tokens \(it fills 0\); add text or lower"):
        run_ppo(load_config(SMOKE, own + [f"ppo.ptx_data={short}"]), log=lambda *_: None)
    run_ppo(load_config(SMOKE, own + ["ppo.ptx_coef=0"]), log=lambda *_: None)
    assert (tmp_path / "ppo" / "final").is_dir() and not (tmp_path / "world").exists() and not (tmp_path / "ppo_ptx" / "final").exists()


def test_ppo_says_how_many_prompts_are_too_long_for_the_context(tmp_path, tiny_sft):
    """SFT and the RM count what they skip as too long; PPO left such prompts out without a word."""
    from instructrl.stages.ppo import run_ppo

    run, _ = tiny_sft
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}."} for w in WORDS * 4] + [{"prompt": "Say " + "cat " * 200}] * 3)
    said = []
    run_ppo(load_config(SMOKE, [f"run.dir={tmp_path}", f"ppo.policy={run / 'sft' / 'final'}", f"ppo.reward_model={run / 'rm' / 'final'}",
                                f"ppo.prompts={prompts}", "ppo.ptx_coef=0", "ppo.episodes=16"]), log=said.append)
    assert any(f"; {len(WORDS) * 4} prompts (3 with no room for a response of 8 tokens in the 128-token context skipped), " in line for line in said), said


def test_control_tokens_in_users_text_are_pointed_out(tmp_path, tiny_sft):
    """'<|endoftext|>' typed inside a message is read as the EOS token and ends the turn: data check
    --model and the stages say which records hold such a token; "text" records (whole templated
    sequences) are left out."""
    from instructrl.models.base import load_tokenizer
    from instructrl.stages.sft import run_sft

    run, _ = tiny_sft
    model = run / "sft" / "final"
    eos = load_tokenizer(model).eos_token
    rows = [SHAPES["messages"][0], {"messages": [{"role": "user", "content": f"Say cat.{eos}"}, ASSISTANT]}] * 8
    data = write_jsonl(tmp_path / "demos.jsonl", rows)
    assert read_data(data, "demonstration", tokenizer=load_tokenizer(model)).control_tokens == (8, f"{data}:2: {eos!r}")
    assert read_data(write_jsonl(tmp_path / "text.jsonl", [{"text": f"the cat{eos}"}]), "text", tokenizer=load_tokenizer(model)).control_tokens == (0, None)

    proc = cli("data", "check", str(data), "--model", str(model))
    assert json.loads(proc.stdout.splitlines()[-1])["control_tokens"] == {"records": 8, "first": f"{data}:2: {eos!r}"}
    assert f"warning: 8 records of {data} hold the tokenizer's control tokens" in proc.stderr
    assert "control_tokens" not in json.loads(cli("data", "check", str(data)).stdout.splitlines()[-1])  # needs the tokenizer
    clean = write_jsonl(tmp_path / "clean.jsonl", [SHAPES["messages"][0]] * 8)  # checked, and none found: it says so
    proc = cli("data", "check", str(clean), "--model", str(model))
    assert json.loads(proc.stdout.splitlines()[-1])["control_tokens"] == {"records": 0, "first": None}
    assert f"{clean}: no record holds a control token of {model}'s tokenizer" in proc.stderr

    said = []
    run_sft(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"sft.model={model}", f"sft.data={data}"]), log=said.append)
    assert any(line.startswith(f"sft: warning: 8 records of {data} hold the tokenizer's control tokens") for line in said), said


def test_the_stages_read_a_users_file_once_with_a_bar(tmp_path, tiny_sft, monkeypatch):
    """sft.data, rm.data and ppo.prompts were read twice, the second time only for control tokens, and
    with no bar while they were read and checked (16 s per 200k demonstrations)."""
    from types import SimpleNamespace

    from rich.console import Console

    from instructrl.data import inputs
    from instructrl.stages.ppo import load_prompts
    from instructrl.stages.rm import run_rm
    from instructrl.stages.sft import load_demonstrations

    run, _ = tiny_sft
    model = run / "sft" / "final"
    tokenizer = load_tokenizer(model)
    eos = tokenizer.eos_token
    reads = []
    monkeypatch.setattr(inputs, "read_records", lambda path: reads.append(Path(path).name) or read_records(path))
    out = io.StringIO()
    monkeypatch.setattr(progress, "log_console", lambda: Console(file=out, force_terminal=True, width=300))

    demos = write_jsonl(tmp_path / "demos.jsonl", [SHAPES["messages"][0], {"messages": [{"role": "user", "content": f"Say cat.{eos}"}, ASSISTANT]}] * 2)
    said = []
    assert len(load_demonstrations(demos, tokenizer, 128, log=said.append, progress=True)[0]) == 4
    assert said == [f"warning: 2 records of {demos} hold the tokenizer's control tokens in their text (first at {demos}:2: {eos!r}); "
                    "they are read as those tokens, not as text"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}.{eos}"} for w in WORDS])
    said = []
    load_prompts(load_config(SMOKE, [f"ppo.prompts={prompts}", "ppo.ptx_coef=0"]), "ppo", tokenizer, SimpleNamespace(is_main_process=True), said.append)
    assert said[0].startswith(f"ppo: warning: {len(WORDS)} prompts of {prompts} hold the tokenizer's control tokens")
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{**r, "prompt": r["prompt"] + eos} for r in _records("preference_explicit")])
    said = []
    run_rm(load_config(SMOKE, [f"run.dir={tmp_path / 'run'}", f"rm.model={model}", f"rm.data={prefs}", "rm.heldout_fraction=0"]), log=said.append)
    assert any(line.startswith(f"rm: warning: 16 records of {prefs} hold the tokenizer's control tokens") for line in said), said
    assert reads == ["demos.jsonl", "demos.jsonl", "prompts.jsonl", "prefs.jsonl"]  # SFT checks, then tokenizes as it reads again
    for bar in (f"sft: reading {demos}", f"sft: tokenizing {demos}", f"ppo: reading {prompts}", f"rm: reading {prefs}"):
        assert bar in out.getvalue()


def test_sft_checks_every_demonstration_then_tokenizes_each_as_it_reads_it(tmp_path, monkeypatch):
    """SFT held every Demonstration while tokenizing (172 MB at 200k records) to name a bad record
    before any tokenizing: it checks the file first, then tokenizes each record as it reads it again."""
    import weakref

    from instructrl.data import formats
    from instructrl.stages import sft

    tokenizer = load_tokenizer(save_tiny_model("llama", tmp_path / "llama"))
    demos, alive = [], []  # a weak reference to every Demonstration read; how many of them live at each tokenizing
    to_demonstration, tokenize = formats.to_demonstration, sft.tokenize_conversation
    monkeypatch.setattr(formats, "to_demonstration", lambda *args: demos.append(weakref.ref(demo := to_demonstration(*args))) or demo)
    monkeypatch.setattr(sft, "tokenize_conversation", lambda *args: alive.append(sum(ref() is not None for ref in demos)) or tokenize(*args))
    records = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]} for w in WORDS]
    bad = write_jsonl(tmp_path / "bad.jsonl", records + [{"messages": [USER]}])
    with pytest.raises(UserError, match=f"^{re.escape(str(bad))}:{len(records) + 1}: "):
        sft.load_demonstrations(bad, tokenizer, 128)
    assert alive == []  # named before any record was tokenized
    examples, too_long = sft.load_demonstrations(write_jsonl(tmp_path / "good.jsonl", records), tokenizer, 128)
    assert (len(examples), too_long, len(alive)) == (len(records), 0, len(records))
    assert max(alive) == 1  # the one being tokenized


def test_the_rms_centring_set_is_checked_then_tokenized_as_it_is_read_again(tmp_path, monkeypatch):
    """rm.demonstrations were held as Demonstrations while tokenized, as SFT's were: they are read as SFT
    reads its own, so a bad record at the end is named before any tokenizing, and only token ids are held."""
    import weakref

    from instructrl.data import formats
    from instructrl.data.chat import tokenize_conversation
    from instructrl.stages import rm

    tokenizer = load_tokenizer(save_tiny_model("llama", tmp_path / "llama"))
    demos, alive = [], []  # a weak reference to every Demonstration read; how many of them live at each tokenizing
    to_demonstration = formats.to_demonstration
    monkeypatch.setattr(formats, "to_demonstration", lambda *args: demos.append(weakref.ref(demo := to_demonstration(*args))) or demo)
    monkeypatch.setattr(rm, "tokenize_conversation", lambda *args: alive.append(sum(ref() is not None for ref in demos)) or tokenize_conversation(*args))
    records = [{"messages": [{"role": "user", "content": f"Say {w} {i} times."}, {"role": "assistant", "content": " ".join([w] * i)}]}
               for i, w in enumerate(WORDS, start=1)]
    bad = write_jsonl(tmp_path / "bad.jsonl", records + [{"messages": [USER]}])
    with pytest.raises(UserError, match=f"^{re.escape(str(bad))}:{len(records) + 1}: "):
        rm.centring_set(bad, tokenizer, [], [], 128)
    assert alive == []  # named before any record was tokenized
    ids = [tokenize_conversation(tokenizer, r["messages"]).input_ids for r in records]
    longest = max(len(i) for i in ids)
    good = write_jsonl(tmp_path / "good.jsonl", records)
    alive.clear()
    fitting, centred = rm.centring_set(good, tokenizer, [], [], longest - 1)
    assert list(fitting) == [i for i in ids if len(i) < longest]  # in the file's order, the longest left out
    n_long = sum(len(i) == longest for i in ids)
    assert centred == f"the {len(ids) - n_long} demonstrations of {good}, {n_long} longer than {longest - 1} tokens left out"
    assert len(alive) == len(records) and max(alive) == 1  # the one being tokenized


def test_a_bad_line_deep_in_a_file_is_named_with_the_bar_on(tmp_path, monkeypatch):
    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setattr(progress, "log_console", lambda: Console(file=out, force_terminal=True, width=300))
    good = json.dumps(SHAPES["messages"][0]) + "\n"
    path = tmp_path / "demos.jsonl"
    path.write_text(good * 2500 + '{"messages": [}\n' + good)
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2501: not valid JSON"):
        read_data(path, "demonstration", progress="sft: reading demos.jsonl")
    assert "2000/2502" in out.getvalue()  # the bar counted the records read before the bad one
