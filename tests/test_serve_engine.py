"""The serving components without HTTP: sampling, streamed text with stop strings, the batching engine."""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import pytest
import torch

from instructrl.data.chat import render_ids
from instructrl.evaluation.generate import generate_answers
from instructrl.models.base import load_causal_lm, load_tokenizer
from instructrl.serve.engine import Engine, Event, QueueFull, SamplingParams, joins_rows
from instructrl.serve.loading import model_name, parse_model_specs, quantize_int8
from instructrl.serve.sampling import LOGPROB_FLOOR, adjusted_logits, sample_next_tokens, token_logprobs, top_p_filter
from instructrl.serve.text import REPLACEMENT, TextStream, TokenTexts, first_stop, stop_prefix_length
from instructrl.errors import UserError

PROMPTS = [
    [{"role": "user", "content": "Reverse the word: green"}],
    [{"role": "user", "content": "Sort these numbers: 5 3 9"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 12 and 30."}],
    [{"role": "user", "content": "Count the items: cat, dog"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "And twice that?"}],
    [{"role": "user", "content": "Upper-case: big red sun"}],
    [{"role": "user", "content": "Which is larger, 14 or 41?"}],
]


@pytest.fixture(scope="module")
def tiny(smoke_base):
    path = smoke_base / "pretrain" / "final"
    return load_causal_lm(path), load_tokenizer(path)


class Collector:
    """A request's sink: the events of each choice, and a way to wait for all of them to finish."""

    def __init__(self, n: int = 1):
        self.events: list[Event] = []
        self.unfinished = n
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason:
            self.unfinished -= 1
            if not self.unfinished:
                self.done.set()

    def wait(self) -> "Collector":
        assert self.done.wait(60), "the engine did not finish the request"
        return self

    def text(self, index: int = 0) -> str:
        return "".join(e.text for e in self.events if e.index == index)

    def finish(self, index: int = 0) -> Event:
        return next(e for e in self.events if e.index == index and e.finish_reason)


# ---------------------------------------------------------------- sampling


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: the top two reach 0.8, so top_p = 0.7 keeps 2 tokens, 0.8 keeps 2, 0.81 keeps 3
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.1) == [True, False, False, False]  # the most likely token always stays
    assert kept(1.0) == [True] * 4


def test_sampling_is_greedy_at_temperature_zero_and_follows_each_rows_generator():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert sample_next_tokens(logits, [0.0, 0.0], [1.0, 1.0], [torch.Generator(), torch.Generator()]) == [1, 0]
    draws = lambda seed: [sample_next_tokens(logits[:1], [1.0], [1.0], [g])[0] for g in [torch.Generator().manual_seed(seed)] for _ in range(30)]  # noqa: E731
    assert draws(3) == draws(3)
    assert len(set(draws(3))) > 1  # sampled, not greedy
    # a temperature too small to divide by is greedy: 1e-300 is 0 in float32, and logits / 1e-40 overflow to inf
    assert sample_next_tokens(logits, [1e-300, 1e-40], [1.0, 1.0], [torch.Generator(), torch.Generator()]) == [1, 0]
    # top_p small enough leaves only the argmax
    assert set(sample_next_tokens(logits[:1].repeat(20, 1), [1.0] * 20, [0.05] * 20, [torch.Generator().manual_seed(i) for i in range(20)])) == {1}



def test_a_rows_token_is_the_one_it_gets_sampled_alone_whatever_shares_its_batch():
    """The batch is sampled in one pass (one copy to the host): greedy rows beside sampled ones,
    each sampled row drawing from its own generator under its own temperature and top-p."""
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    temperatures, top_ps = [0.0, 0.7, 1.0, 0.0, 1.5, 0.3], [1.0, 0.9, 1.0, 0.5, 0.8, 1.0]
    for seed in range(20):
        together = sample_next_tokens(logits, temperatures, top_ps, [torch.Generator().manual_seed(seed * 10 + b) for b in range(6)])
        alone = [sample_next_tokens(logits[b : b + 1], temperatures[b : b + 1], top_ps[b : b + 1], [torch.Generator().manual_seed(seed * 10 + b)])[0]
                 for b in range(6)]
        assert together == alone
        assert together[0] == int(logits[0].argmax()) and together[3] == int(logits[3].argmax())


def test_penalties_and_logit_bias_change_the_logits_as_openai_documents():
    # OpenAI: logits[j] - c[j] * frequency - (c[j] > 0) * presence, then logit_bias[j] added; the answer so far is 0 0 2
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0])
    adjusted = adjusted_logits(logits, [0, 0, 2], presence_penalty=0.5, frequency_penalty=1.0, bias=[(1, -100.0), (3, 5.0)])
    # token 0: 2 - 2 * 1 - 0.5; token 1: 1 - 100 (never generated); token 2: 0.5 - 1 - 0.5; token 3: 0 + 5
    assert adjusted.tolist() == [-0.5, -99.0, -1.0, 5.0]
    assert logits.tolist() == [2.0, 1.0, 0.5, 0.0]  # the model's own logits stay as they were (log-probs read them)
    assert adjusted_logits(logits, [0, 0, 2], 0.0, 0.0, []).tolist() == logits.tolist()
    # negative penalties encourage repeats: token 0 gains 2 * 0.5 + 1
    assert adjusted_logits(logits, [0, 0], presence_penalty=-1.0, frequency_penalty=-0.5, bias=[]).tolist() == [4.0, 1.0, 0.5, 0.0]


# ---------------------------------------------------------------- text and stop strings


class CharTokenizer:
    """Token i is chr(i); 0 is a special token that decoding skips (as EOS is)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def feed(stream: TextStream, text: str) -> tuple[list[str], bool]:
    pieces = []
    for ch in text:
        piece, stopped = stream.add(ord(ch))
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces, False


def test_stop_helpers():
    assert stop_prefix_length("Hello\nUs", ["\nUser:"]) == 3
    assert stop_prefix_length("Hello", ["\nUser:"]) == 0
    assert stop_prefix_length("abab", ["abc", "bab!"]) == 3
    assert first_stop("a STOP b END", ["END", "STOP"]) == 2
    assert first_stop("abc", ["x"]) == -1


def test_text_stream_cuts_at_a_stop_string_spanning_tokens_and_never_sends_it():
    stream = TextStream(CharTokenizer(), ["END"])
    pieces, stopped = feed(stream, "ok ENxEND more")
    assert stopped
    assert "".join(pieces) == "ok ENx"
    # "EN" was held back until the "x" showed it was not the stop string
    assert pieces[3:6] == ["", "", "ENx"]


def test_text_stream_releases_held_text_when_generation_ends_otherwise():
    stream = TextStream(CharTokenizer(), ["END"])
    pieces, stopped = feed(stream, "abE")
    assert not stopped and "".join(pieces) == "ab"
    assert stream.finish() == "E"


def test_text_stream_skips_special_tokens():
    stream = TextStream(CharTokenizer())
    assert stream.add(ord("a")) == ("a", False)
    assert stream.add(0) == ("", False)


# ---------------------------------------------------------------- the engine


class JoiningEngine(Engine):
    """Submits ``later`` requests right after its first sampling step, and counts the times they join a running batch."""

    joins = 0
    later: list = []

    def _sample(self, rows, logits):
        super()._sample(rows, logits)
        later, self.later = self.later, []
        for args in later:  # on the engine's thread, between the first request's steps
            self.submit(*args)

    def _merge(self, cache, mask, new_cache, new_mask):
        self.joins += cache is not None
        return super()._merge(cache, mask, new_cache, new_mask)


def greedy_while_joining(model, tokenizer, max_tokens: int | list[int] = 12) -> tuple[list[str], list[Collector], int]:
    """Greedy answers to PROMPTS: the first alone, the rest joining its batch after its first token.
    ``max_tokens``: one for every prompt, or each prompt's."""
    engine = JoiningEngine(model, tokenizer, max_batch=8, batch_wait_s=0)
    sinks = [Collector() for _ in PROMPTS]
    budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(PROMPTS)
    requests = [(render_ids(tokenizer, messages, True), SamplingParams(budget, temperature=0.0), 1, sink)
                for messages, sink, budget in zip(PROMPTS, sinks, budgets)]
    engine.later = requests[1:]
    engine.submit(*requests[0])
    engine.start()
    try:
        answers = [c.wait().text() for c in sinks]
    finally:
        engine.stop()
    return answers, sinks, engine.joins


def test_engine_greedy_answers_match_generate_while_requests_join_and_leave(tiny):
    model, tokenizer = tiny
    answers, collectors, joins = greedy_while_joining(model, tokenizer)
    assert joins >= 1
    assert [a.strip() for a in answers] == generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
    for c in collectors:
        finish = c.finish()
        assert finish.finish_reason in ("stop", "length") and 1 <= finish.completion_tokens <= 12
        assert finish.finish_reason == "stop" or finish.completion_tokens == 12


def test_engine_serves_a_gpt2_checkpoint_too(tiny):
    from instructrl.config import ModelConfig
    from instructrl.models.base import build_base_model

    _, tokenizer = tiny
    torch.manual_seed(0)
    gpt2 = build_base_model(ModelConfig(arch="gpt2", n_layer=2, hidden_size=32, n_head=2, max_length=128), tokenizer).eval()
    answers, _, joins = greedy_while_joining(gpt2, tokenizer)
    assert joins >= 1
    assert [a.strip() for a in answers] == generate_answers(gpt2, tokenizer, PROMPTS, max_new_tokens=12)


def test_engine_serves_a_sliding_window_model_while_requests_join_and_leave(tmp_path):
    """Mistral's (and Gemma 2's and 3's) sliding-window layers keep only the window's last keys in
    the model's own KV cache. The engine's batch is longer than the window when requests join it,
    and the longest prompt leaves it first (its padding columns are then cut): each answer is still
    the one generate gives the prompt alone."""
    from tiny_models import SLIDING_WINDOW, save_tiny_model

    path = save_tiny_model("mistral", tmp_path / "mistral")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer=tokenizer).eval()
    budgets = [12, 12, 12, 2, 12, 12]  # PROMPTS[3], the longest, leaves after two tokens
    assert max(range(len(PROMPTS)), key=lambda i: len(render_ids(tokenizer, PROMPTS[i], True))) == 3
    assert min(len(render_ids(tokenizer, p, True)) for p in PROMPTS) > SLIDING_WINDOW
    assert joins_rows(model)  # sliding layers keep keys and values by position: batched as any other model
    answers, _, joins = greedy_while_joining(model, tokenizer, budgets)
    assert joins >= 1
    assert [a.strip() for a in answers] == [generate_answers(model, tokenizer, [p], max_new_tokens=n)[0] for p, n in zip(PROMPTS, budgets)]


def test_engine_serves_a_hybrid_recurrent_model_one_sequence_at_a_time(tmp_path):
    """LFM2's convolution layers (as Mamba's, Jamba's, Qwen3-Next's) keep a state per sequence that left
    padding would change and that transformers cannot drop a row of: joining the batch failed every
    request in it. Requests that arrive while another runs now wait for it, and each answer is the
    one generate gives the prompt alone."""
    from tiny_models import save_tiny_model

    path = save_tiny_model("lfm2", tmp_path / "lfm2")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer=tokenizer).eval()
    assert not joins_rows(model) and Engine(model, tokenizer, max_batch=8).max_batch == 1
    budgets = [12, 3, 12, 2, 7, 12]
    answers, collectors, joins = greedy_while_joining(model, tokenizer, budgets)
    assert joins == 0 and all(c.finish().finish_reason in ("stop", "length") for c in collectors)
    assert [a.strip() for a in answers] == [generate_answers(model, tokenizer, [p], max_new_tokens=n)[0] for p, n in zip(PROMPTS, budgets)]


def test_engine_seed_reproduces_samples_and_n_choices_differ(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer).start()
    prompt = render_ids(tokenizer, PROMPTS[1], True)

    def sample(seed: int) -> list[str]:
        sink = Collector(4)
        engine.submit(prompt, SamplingParams(16, temperature=1.0, seed=seed), 4, sink)
        return [sink.wait().text(i) for i in range(4)]

    try:
        a, b, c = sample(7), sample(7), sample(8)
    finally:
        engine.stop()
    assert a == b
    assert a != c
    assert len(set(a)) > 1


def test_engine_seeded_choices_do_not_depend_on_what_shares_the_batch(tiny):
    """A seeded request with n = 3 samples the same answers alone, with requests joining its batch and
    leaving it before it ends, and when it joins a batch already running."""
    model, tokenizer = tiny
    mine = render_ids(tokenizer, PROMPTS[1], True), SamplingParams(16, temperature=1.0, seed=5)

    def others() -> list[tuple]:
        return [(render_ids(tokenizer, messages, True), SamplingParams(2 + 3 * i, temperature=0.9, top_p=0.9 if i % 2 else 1.0), 1 + i % 2, Collector(1 + i % 2))
                for i, messages in enumerate(PROMPTS)]

    def sample(first: list[tuple], later: list[tuple]) -> tuple[list[str], int]:
        engine = JoiningEngine(model, tokenizer, max_batch=16, batch_wait_s=0)
        engine.later = later
        for request in first:
            engine.submit(*request)
        sink = next(request[3] for request in first + later if request[0] is mine[0])
        engine.start()
        try:
            return [sink.wait().text(i) for i in range(3)], engine.joins
        finally:
            engine.stop()

    alone, _ = sample([(*mine, 3, Collector(3))], [])
    joined_by_others, joins = sample([(*mine, 3, Collector(3))], others())
    assert joins >= 1 and joined_by_others == alone
    joining_others, joins = sample(others(), [(*mine, 3, Collector(3))])
    assert joins >= 1 and joining_others == alone
    assert len(set(alone)) > 1


def test_engine_cancelled_request_leaves_the_batch_and_others_finish(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer).start()
    try:
        gone, stays = Collector(), Collector()
        request = engine.submit(render_ids(tokenizer, PROMPTS[0], True), SamplingParams(64, temperature=1.0, seed=1), 1, gone)
        request.cancel()
        engine.submit(render_ids(tokenizer, PROMPTS[1], True), SamplingParams(24, temperature=1.0, seed=2), 1, stays)
        stays.wait()
        events_after_cancel = len(gone.events)
    finally:
        engine.stop()
    assert stays.finish().finish_reason in ("stop", "length")
    assert not gone.done.is_set() and events_after_cancel <= 1


def test_engine_queue_bound_raises_queue_full(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_queue=2)  # not started: requests stay queued
    for _ in range(2):
        engine.submit([1, 2, 3], SamplingParams(4), 1, Collector())
    with pytest.raises(QueueFull):
        engine.submit([1, 2, 3], SamplingParams(4), 1, Collector())
    with pytest.raises(ValueError):
        engine.submit([1, 2, 3], SamplingParams(4), engine.max_batch + 1, Collector())


def test_engine_reports_a_failed_forward_pass_as_an_error_event(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer).start()
    try:
        sink = Collector()
        engine.submit([len(tokenizer) + 1000], SamplingParams(4, temperature=0.0), 1, sink)  # an id past the embedding table
        assert sink.wait().finish().finish_reason == "error"
        ok = Collector()
        engine.submit(render_ids(tokenizer, PROMPTS[0], True), SamplingParams(4, temperature=0.0), 1, ok)
        assert ok.wait().finish().finish_reason in ("stop", "length")  # the engine still serves
    finally:
        engine.stop()


# ---------------------------------------------------------------- loading


def test_model_names_and_specs():
    assert model_name("runs/default/sft/final") == "sft"
    assert model_name("runs/default/ppo_ptx/final/") == "ppo_ptx"
    assert model_name("my-model") == "my-model"
    assert parse_model_specs(["a=runs/x/final", "runs/y/sft/final"]) == {"a": "runs/x/final", "sft": "runs/y/sft/final"}
    with pytest.raises(UserError, match="two models are named 'sft'"):
        parse_model_specs(["a/sft/final", "b/sft/final"])


def test_int8_quantisation_replaces_linears_and_still_answers(tiny):
    import copy

    model, tokenizer = tiny
    quantized = quantize_int8(copy.deepcopy(model))
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    assert any(isinstance(m, DynamicQuantizedLinear) for m in quantized.modules())
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    ids = torch.tensor([render_ids(tokenizer, PROMPTS[0], True)])
    with torch.no_grad():
        full, int8 = model(input_ids=ids).logits[0, -1], quantized(input_ids=ids).logits[0, -1]
    assert torch.corrcoef(torch.stack([full, int8]))[0, 1] > 0.95  # close to the float model, not equal
    engine = Engine(quantized, tokenizer).start()
    try:
        sink = Collector()
        engine.submit(ids[0].tolist(), SamplingParams(8, temperature=0.0), 1, sink)
        assert sink.wait().finish().completion_tokens >= 1
    finally:
        engine.stop()


def test_importing_the_engine_or_the_math_does_not_import_the_web_server():
    code = "import sys, instructrl.serve.engine, instructrl.serve.terminal_chat, instructrl.rlmath; print('fastapi' in sys.modules, 'uvicorn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_serving_dtype_loads_the_weights_as_asked_and_still_answers(tmp_path):
    from tiny_models import save_tiny_model

    from instructrl.serve.loading import load_engine, serving_dtype

    path = save_tiny_model("llama", tmp_path / "llama")
    assert serving_dtype("auto", "cuda", "none") == "auto"  # a GPU keeps the checkpoint's own (a bf16 model: half the memory)
    assert serving_dtype("auto", "cpu", "none") == torch.float32 and serving_dtype("auto", "cpu", "int8") == torch.float32
    for bad, quantize, needle in (("half", "none", "--dtype 'half'"), ("bfloat16", "int8", "--quantize int8 quantises float32")):
        with pytest.raises(UserError, match=needle):
            serving_dtype(bad, "cpu", quantize)
    for dtype, expected in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        engine = load_engine(str(path), device="cpu", dtype=dtype, batch_wait_s=0)
        assert {p.dtype for p in engine.model.parameters()} == {expected}
        engine.start()
        try:
            sink = Collector()
            engine.submit(engine.tokenizer("Say cat.").input_ids, SamplingParams(6, temperature=0.7, seed=1), 1, sink)
            assert sink.wait().finish().completion_tokens >= 1
        finally:
            engine.stop()


def test_a_device_torch_cannot_use_is_named_before_the_model_loads(tmp_path, monkeypatch):
    # torch.device('tpu') raised a RuntimeError, and .to('cuda') without a GPU an AssertionError, as tracebacks
    from instructrl.serve.loading import load_engine, serving_device

    missing = str(tmp_path / "no-model")  # the device is refused first: nothing is loaded for a device that cannot run it
    for device, needle in (("tpu", "--device 'tpu': choose cpu or cuda"), ("mps", "--device 'mps'"), ("cuda:x", "--device 'cuda:x'")):
        with pytest.raises(UserError, match=needle):
            load_engine(missing, device=device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match="--device cuda: torch finds no CUDA GPU here; use --device cpu"):
        load_engine(missing, device="cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert serving_device("cuda") == "cuda" and serving_device("cuda:1") == "cuda:1" and serving_device("cpu") == "cpu"
    assert serving_device("cpu:0") == "cpu"  # int8 serving refused cpu:0 with "use --device cpu"
    with pytest.raises(UserError, match="no-model"):  # past the device checks, to the missing model
        load_engine(missing, quantize="int8", device="cpu:0")
    with pytest.raises(UserError, match="--device cuda:2: only cuda:0 to cuda:1 are here"):
        serving_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac: its GPU is served on
    assert serving_device("mps") == "mps"


def test_a_model_that_returns_no_cache_is_refused_at_load(tmp_path):
    """RecurrentGemma keeps its state in its own modules and restarts it on every call without a cache:
    every request to it failed (KeyError: 'cache'), with a 500."""
    from tiny_models import save_tiny_model

    from instructrl.serve.loading import load_engine

    path = save_tiny_model("recurrent_gemma", tmp_path / "recurrent-gemma")
    with pytest.raises(UserError, match="RecurrentGemmaForCausalLM.*returns no cache"):
        load_engine(str(path), device="cpu")
    assert load_engine(str(save_tiny_model("lfm2", tmp_path / "lfm2")), device="cpu").one_at_a_time


# ---------------------------------------------------------------- log-probs


class ByteTokenizer:
    """Token i is byte i - 1 (0 is a special token decoding skips): a character of several bytes takes several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 1 for i in ids if i).decode("utf-8", "replace")


def byte_ids(text: str) -> list[int]:
    return [b + 1 for b in text.encode()]


def test_token_logprobs_score_the_raw_distribution_with_the_top_alternatives():
    # probabilities 0.5, 0.3, 0.2 (logits are their logs plus 7: log_softmax removes the shift)
    logits = torch.tensor([0.5, 0.3, 0.2]).log() + 7
    [one, two] = token_logprobs(torch.stack([logits, logits]), [1, 2], [2, 0])
    assert (one.token_id, two.token_id) == (1, 2)
    assert one.logprob == pytest.approx(math.log(0.3)) and two.logprob == pytest.approx(math.log(0.2))
    assert [t for t, _ in one.top] == [0, 1] and [lp for _, lp in one.top] == pytest.approx([math.log(0.5), math.log(0.3)])
    assert two.top == ()
    # a token the model rules out gets a finite floor JSON can carry, not -inf
    [ruled_out] = token_logprobs(torch.tensor([[0.0, float("-inf")]]), [1], [1])
    assert ruled_out.logprob == LOGPROB_FLOOR and ruled_out.top == ((0, 0.0),)


def test_text_stream_releases_each_token_with_the_first_character_of_its_text():
    stream = TextStream(CharTokenizer(), ["END"], token_starts=True)
    for ch, released in zip("ok EN", [1, 2, 3, 3, 3]):  # "E" and "N" may begin the stop string: held back with their tokens
        stream.add(ord(ch))
        assert stream.released_tokens == released
    assert stream.add(ord("x")) == ("ENx", False) and stream.released_tokens == 6
    _, stopped = feed(stream, "abEND more")
    assert stopped and stream.text == "ok ENxab"
    assert stream.released_tokens == 8  # the stop string's tokens never are
    assert stream.starts[:8] == list(range(8))


def test_text_stream_puts_each_byte_of_a_character_where_the_character_begins():
    stream = TextStream(ByteTokenizer(), token_starts=True)
    for token in byte_ids("aé☃b"):  # 1 + 2 + 3 + 1 bytes
        stream.add(token)
    assert stream.text == "aé☃b" and stream.starts == [0, 1, 1, 2, 2, 2, 3]
    assert stream.released_tokens == 7
    # a byte that never becomes a character is text of its own (a replacement character): the next token begins after it
    stream = TextStream(ByteTokenizer(), token_starts=True)
    for token in [0xFF + 1, *byte_ids("ok")]:
        stream.add(token)
    assert stream.text == "\ufffdok" and stream.starts == [0, 1, 2]
    # EOS ends the answer where its text ends, and every token goes out with it
    stream = TextStream(ByteTokenizer(), token_starts=True)
    stream.add(byte_ids("é")[0])
    assert stream.released_tokens == 0
    stream.finish(end_token=0)
    assert stream.starts == [0, 1] and stream.released_tokens == 2


def test_token_texts_give_exact_bytes_even_for_part_of_a_character(tiny):
    _, tokenizer = tiny
    texts = TokenTexts(tokenizer)
    assert texts.byte_level
    text = "héllo — ☃ 日本"
    ids = tokenizer(text)["input_ids"]
    assert b"".join(bytes(texts(i)[1]) for i in ids).decode() == text
    partial = [texts(i) for i in ids if REPLACEMENT in tokenizer.decode([i])]
    assert partial, "the tokenizer has no token holding part of a character"
    for token, raw in partial:  # shown escaped, as OpenAI shows such a token
        assert token == bytes(raw).decode("utf-8", "backslashreplace") and token.startswith("\\x")
    assert texts(tokenizer.eos_token_id) == (tokenizer.eos_token, list(tokenizer.eos_token.encode()))


def test_token_texts_of_a_sentencepiece_vocabulary_keep_spaces_and_raw_bytes():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581hi": 1, "<0xC3>": 2, "<0xA9>": 3, "x": 4}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    texts = TokenTexts(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert not texts.byte_level
    assert texts(1) == (" hi", list(b" hi"))  # decoding the token alone would strip its space
    assert texts(2) == ("\\xc3", [0xC3]) and texts(3) == ("\\xa9", [0xA9])
    assert texts(4) == ("x", [ord("x")])


def alone_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V): log-probs of each next token, from one forward pass of ``ids`` alone."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def test_engine_logprobs_are_a_forward_pass_of_each_answer_alone_whatever_shares_the_batch(tiny):
    """Prompts of different lengths (left padding), sampled at their own temperature and top-p, n = 2,
    beside a row that asks for no log-probs: each token is scored by the model's raw distribution."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, batch_wait_s=0.2)  # the requests share the prefill and the decode steps
    asks = [(render_ids(tokenizer, PROMPTS[0], True), SamplingParams(12, 0.7, 0.9, seed=1, logprobs=3, prompt_logprobs=True), 2),
            (render_ids(tokenizer, PROMPTS[3], True), SamplingParams(12, 1.0, seed=2, logprobs=0), 1),
            (render_ids(tokenizer, PROMPTS[1], True), SamplingParams(12, 1.0, seed=3), 1)]
    sinks = [Collector(n) for _, _, n in asks]
    for (prompt, params, n), sink in zip(asks, sinks):
        engine.submit(prompt, params, n, sink)
    engine.start()
    try:
        for sink in sinks:
            sink.wait()
    finally:
        engine.stop()
    assert engine.steps <= 13  # one prefill, then decode steps shared by every row
    for (prompt, params, n), sink in zip(asks, sinks):
        for index in range(n):
            events = [e for e in sink.events if e.index == index]
            generated = [lp for e in events for lp in e.logprobs]
            if params.logprobs is None:
                assert generated == [] and all(e.prompt_logprobs == () for e in events)
                continue
            assert len(generated) == events[-1].completion_tokens  # neither a stop string here nor a token left out
            ids = prompt + [lp.token_id for lp in generated]
            alone = alone_logprobs(model, ids)
            expected = alone[len(prompt) - 1 :].gather(-1, torch.tensor(ids[len(prompt) :])[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor([lp.logprob for lp in generated]), expected, atol=1e-4)
            for lp, row in zip(generated, alone[len(prompt) - 1 :]):
                top = row.topk(params.logprobs)
                assert [t for t, _ in lp.top] == top.indices.tolist()
                assert torch.allclose(torch.tensor([v for _, v in lp.top]), top.values, atol=1e-4)
            scored_prompt = events[0].prompt_logprobs if params.prompt_logprobs else ()
            if params.prompt_logprobs:
                assert [lp.token_id for lp in scored_prompt] == prompt and scored_prompt[0].logprob is None
                expected = alone[: len(prompt) - 1].gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
                assert torch.allclose(torch.tensor([lp.logprob for lp in scored_prompt[1:]]), expected, atol=1e-4)


def test_a_batch_without_log_probs_computes_none(tiny, monkeypatch):
    """No cost when no one asks: the decode loop never scores a row that did not ask."""
    import instructrl.serve.engine as engine_module

    model, tokenizer = tiny
    scored_rows = []
    real = engine_module.token_logprobs

    def counting(logits, tokens, top_ks):
        scored_rows.append(len(tokens))
        return real(logits, tokens, top_ks)

    monkeypatch.setattr(engine_module, "token_logprobs", counting)
    engine = Engine(model, tokenizer, batch_wait_s=0.2)
    plain, asking = Collector(3), Collector()
    engine.submit(render_ids(tokenizer, PROMPTS[0], True), SamplingParams(8, 1.0, seed=1), 3, plain)
    engine.submit(render_ids(tokenizer, PROMPTS[1], True), SamplingParams(8, 1.0, seed=2, logprobs=2), 1, asking)
    engine.start()
    try:
        plain.wait(), asking.wait()
        assert scored_rows and set(scored_rows) == {1}  # only the asking row, at each of its steps
        scored_rows.clear()
        alone = Collector()
        engine.submit(render_ids(tokenizer, PROMPTS[2], True), SamplingParams(8, 1.0, seed=3), 1, alone)
        alone.wait()
    finally:
        engine.stop()
    assert scored_rows == []
