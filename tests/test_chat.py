"""The tokenizer, its chat template, and conversations tokenized with an assistant mask."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from instructrl.data.chat import tokenize_conversation
from instructrl.data.records import validate_messages
from instructrl.errors import UserError
from instructrl.models.tokenizer import ASSISTANT, BOS, EOS, PAD, USER, train_tokenizer
from instructrl.world.corpus import corpus_documents


@pytest.fixture(scope="module")
def tok():
    # a few hundred short sentences are plenty for 300 tokens (256 bytes + 6 specials + merges)
    texts = [s + "." for doc in corpus_documents(120, seed=0) for s in doc.split(". ")]
    return train_tokenizer(texts, vocab_size=300)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- special tokens


def test_special_tokens_exist_and_pad_is_not_eos(tok):
    for token, token_id in ((PAD, tok.pad_token_id), (EOS, tok.eos_token_id), (BOS, tok.bos_token_id)):
        assert token_id is not None, token
        assert tok.convert_tokens_to_ids(token) == token_id, token
    assert tok.pad_token_id != tok.eos_token_id


def test_special_tokens_are_single_tokens(tok):
    # '<|assistant|>' written in text is one token, not its 13 characters
    assert ids(tok, ASSISTANT + USER) == [tok.convert_tokens_to_ids(ASSISTANT), tok.convert_tokens_to_ids(USER)]


def test_saved_tokenizer_reloads_with_the_same_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "the cat sees 12 apples.<|user|>Hi<|eos|>"
    assert ids(reloaded, text) == ids(tok, text)
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.bos_token_id) == (
        tok.pad_token_id, tok.eos_token_id, tok.bos_token_id,
    )
    assert reloaded.chat_template == tok.chat_template


def test_digits_are_split_one_per_token(tok):
    # "individual_digits": '2024' is four tokens, one per digit
    assert [tok.decode([i]) for i in ids(tok, "2024")] == ["2", "0", "2", "4"]


# ---------------------------------------------------------------- chat template


def test_chat_template_one_turn(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    # user marker + content, assistant marker + content + EOS, nothing between
    assert text == "<|user|>Hi<|assistant|>Hello<|eos|>"


def test_chat_template_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<|user|>Hi<|assistant|>"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == "<|user|>Hi"


def test_chat_template_system_turn(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<|system|>Be brief.<|user|>Hi"


# ---------------------------------------------------------------- assistant mask

TWO_TURNS = [
    {"role": "user", "content": "Reverse the word tiger."},
    {"role": "assistant", "content": "regit"},
    {"role": "user", "content": "Now do the same for 12 and 7."},
    {"role": "assistant", "content": "the answer is 19"},
]


def test_mask_covers_exactly_the_assistant_contents_and_their_eos(tok):
    conv = tokenize_conversation(tok, TWO_TURNS)
    assert len(conv.input_ids) == len(conv.assistant_mask)
    masked = [t for t, m in zip(conv.input_ids, conv.assistant_mask) if m]
    # special tokens are split off before BPE, so each content tokenizes as it does alone:
    # regit, EOS, the answer is 19, EOS
    eos = tok.eos_token_id
    assert masked == ids(tok, "regit") + [eos] + ids(tok, "the answer is 19") + [eos]
    assert tok.decode(masked) == "regit<|eos|>the answer is 19<|eos|>"


def chatml_tokenizer():
    """A Qwen2-Instruct-like tokenizer: ChatML template, EOS = <|im_end|>, a newline after every turn's end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["user assistant say cat dog\n"] * 4, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_start|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def test_chatml_conversation_ends_at_the_turns_eos_as_a_sampled_response_does():
    tok = chatml_tokenizer()
    prompt = [{"role": "user", "content": "say cat"}]
    conv = tokenize_conversation(tok, prompt + [{"role": "assistant", "content": "cat"}])
    # what PPO scores for a sampled "cat": the generation prompt, the response, its EOS; no second EOS
    prefix = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert conv.input_ids == ids(tok, prefix + "cat") + [tok.eos_token_id]
    assert conv.input_ids.count(tok.eos_token_id) == 2  # the user turn's end and the assistant turn's
    assert tok.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m]) == "cat<|im_end|>"


def test_chatml_earlier_turns_are_learnt_up_to_their_eos_not_the_newline_after():
    tok = chatml_tokenizer()
    messages = [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat"},
                {"role": "user", "content": "say dog"}, {"role": "assistant", "content": "dog"}]
    conv = tokenize_conversation(tok, messages)
    assert tok.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m]) == "cat<|im_end|>dog<|im_end|>"


def test_mask_count(tok):
    conv = tokenize_conversation(tok, TWO_TURNS)
    # content tokens of each turn, plus one EOS each
    assert sum(conv.assistant_mask) == len(ids(tok, "regit")) + 1 + len(ids(tok, "the answer is 19")) + 1


def test_unmasked_tokens_are_the_user_turns_and_markers(tok):
    conv = tokenize_conversation(tok, TWO_TURNS)
    unmasked = [t for t, m in zip(conv.input_ids, conv.assistant_mask) if not m]
    # everything the model does not write: user markers and contents, and the <|assistant|>
    # marker that opens each assistant turn (it belongs to the prompt)
    assert tok.decode(unmasked) == (
        "<|user|>Reverse the word tiger.<|assistant|><|user|>Now do the same for 12 and 7.<|assistant|>"
    )


def test_masked_turns_are_contiguous_and_in_place(tok):
    conv = tokenize_conversation(tok, TWO_TURNS)
    # two runs of ones, each right after an <|assistant|> marker
    runs, previous = [], 0
    for pos, m in enumerate(conv.assistant_mask):
        if m and not previous:
            runs.append(pos)
        previous = m
    assert len(runs) == 2
    assistant_id = tok.convert_tokens_to_ids(ASSISTANT)
    assert [conv.input_ids[pos - 1] for pos in runs] == [assistant_id, assistant_id]
    assert conv.input_ids[-1] == tok.eos_token_id and conv.assistant_mask[-1] == 1


def test_tokenized_ids_match_the_rendered_text(tok):
    conv = tokenize_conversation(tok, TWO_TURNS)
    assert conv.input_ids == ids(tok, tok.apply_chat_template(TWO_TURNS, tokenize=False))


# ---------------------------------------------------------------- validate_messages


def test_validate_messages_accepts_a_demonstration():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert validate_messages(messages, "demos.jsonl:3") == messages


@pytest.mark.parametrize("messages", ["Hi", {"role": "user"}, None, []])
def test_validate_messages_rejects_a_non_list(messages):
    with pytest.raises(UserError, match=r"^demos\.jsonl:3: 'messages' must be a non-empty list"):
        validate_messages(messages, "demos.jsonl:3")


def test_validate_messages_rejects_a_bad_role():
    messages = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]
    # the second message (index 1) is the bad one
    with pytest.raises(UserError, match=r"^demos\.jsonl:3: messages\[1\] must be"):
        validate_messages(messages, "demos.jsonl:3")


def test_validate_messages_rejects_non_string_content():
    with pytest.raises(UserError, match=r"^demos\.jsonl:3: messages\[0\]\.content: must be a string or a list of text parts, not int$"):
        validate_messages([{"role": "assistant", "content": 7}], "demos.jsonl:3")


def test_validate_messages_requires_the_assistant_last():
    messages = [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(UserError, match=r"^demos\.jsonl:3: the last message must be the assistant's"):
        validate_messages(messages, "demos.jsonl:3")


# ---------------------------------------------------------------- OpenAI's weights, tool calls and results

WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "say cat weather"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": "sunny"},
    {"role": "assistant", "content": "say sunny"},
]


def test_a_turn_of_weight_0_is_context_not_learnt(tok):
    """OpenAI's fine-tuning weight: 0 leaves an assistant turn out of the loss (it was refused: an unknown field)."""
    weighted = [TWO_TURNS[0], {**TWO_TURNS[1], "weight": 0}, TWO_TURNS[2], {**TWO_TURNS[3], "weight": 1}]
    plain, conv = tokenize_conversation(tok, TWO_TURNS), tokenize_conversation(tok, weighted)
    assert conv.input_ids == plain.input_ids  # the weight is ours: the template never sees it
    assert tok.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m]) == "the answer is 19<|eos|>"


def test_tool_calls_are_learnt_and_tool_results_are_not_under_a_template_that_renders_them():
    from tiny_models import TOOL_TEMPLATE

    tok = chatml_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    conv = tokenize_conversation(tok, TOOL_CONVERSATION, WEATHER_TOOLS)
    text = tok.decode(conv.input_ids)
    assert text.startswith('[tools]{"type": "function", "function": {"name": "get_weather"') and "[tool]sunny[assistant]say sunny" in text
    learnt = tok.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m])
    assert learnt == '<call>get_weather {"city": "Paris"}</call><|im_end|>say sunny<|im_end|>'


@pytest.mark.parametrize("tools, messages", [(WEATHER_TOOLS, TOOL_CONVERSATION), (None, TOOL_CONVERSATION),
                                             (WEATHER_TOOLS, [TOOL_CONVERSATION[0], TOOL_CONVERSATION[3]])])
def test_a_template_that_drops_tool_turns_is_refused_not_silently_trained_on(tok, tools, messages):
    """The built-in template writes system, user and assistant turns only: the call, the result and
    the tools offered were dropped, and the model learnt an answer to a result it never saw."""
    with pytest.raises(UserError, match=r"^the model's chat template does not render tool definitions and calls and results \(it would drop them\)"):
        tokenize_conversation(tok, messages, tools)


class CountingTokenizer:
    """``tok``, counting the calls that tokenize text."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_conversation_is_tokenized_in_one_call_with_the_ids_of_one_call_per_rendering(tok):
    """A large sft.data spent most of its minutes in three tokenizer calls per one-turn
    conversation; one call of the distinct renderings gives the same ids and mask."""
    counting = CountingTokenizer(tok)
    conv = tokenize_conversation(counting, TWO_TURNS)
    assert counting.calls == 1
    full = ids(tok, tok.apply_chat_template(TWO_TURNS, tokenize=False))
    assert conv.input_ids == full[: len(conv.input_ids)] and conv.input_ids[-1] == tok.eos_token_id
    assert conv == tokenize_conversation(tok, TWO_TURNS)
    assert [m for t, m in zip(conv.input_ids, conv.assistant_mask) if t == tok.eos_token_id] == [1, 1]
