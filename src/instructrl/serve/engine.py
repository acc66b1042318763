"""The batching generation engine: one worker thread decodes every request's rows together.

Requests join the running batch at any decode step (their prompts are prefilled as a left-padded
batch and their KV cache is merged into the running one, left-padded to the same length) and
leave it as soon as they finish, so throughput grows with the number of concurrent requests
and a short answer never waits for a long one. Each choice of each request is one row with its
own temperature, top-p, stop strings, token budget and random generator. Results go out token
by token through the request's ``sink``, called from the worker thread: a slow consumer only
lets its own events pile up, and a cancelled request leaves the batch at the next step.

Log-probs are computed only for the rows that ask for them: each sampled token's, released
with its text, and the prompt's (from a prefill that keeps every position's logits).

A model with recurrent layers (``joins_rows``: Mamba, LFM2, Jamba, Qwen3-Next, Falcon-H1) is
served one sequence at a time, as a batch of one that nothing joins and that ends with it.
"""

from __future__ import annotations

import inspect
import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from instructrl.models.base import context_length
from instructrl.padding import leading_padding, pad_sequences, position_ids_from_mask
from instructrl.serve.sampling import TokenLogprob, adjusted_logits, sample_next_tokens, token_logprobs
from instructrl.serve.text import TextStream, text_offsets


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (the API answers 429)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # 0: only score the prompt (with ``prompt_logprobs``)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    presence_penalty: float = 0.0  # OpenAI's penalties on the tokens the answer already holds (sampling.adjusted_logits)
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: Optional[int] = None  # each sampled token's log-prob and its this many most likely alternatives; None: none
    prompt_logprobs: bool = False  # the prompt's tokens' log-probs too (with ``logprobs`` alternatives each)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class Event:
    """One step of one choice: new text, and when it ends, why (stop, length or error)."""

    index: int  # which of the request's n choices
    text: str
    finish_reason: Optional[str] = None  # "stop", "length", or "error" (then ``text`` is the message)
    completion_tokens: int = 0  # tokens generated so far for this choice, EOS and stop tokens included
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens whose text this event releases (and EOS), when asked
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # the prompt's, in a choice's first event, when asked


Sink = Callable[[Event], None]


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request; its rows leave the batch at the next step."""
        self.cancelled.set()


@dataclass
class _Row:
    request: Request
    index: int
    generator: torch.Generator
    text: TextStream
    next_token: int = -1  # sampled, not yet fed through the model
    generated: int = 0
    logprobs: Optional[list[TokenLogprob]] = None  # every generated token's, when the request asks
    logprobs_sent: int = 0

    def released_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The log-probs of the tokens whose text went out since the last call (see ``TextStream``)."""
        if self.logprobs is None:
            return ()
        upto = self.text.released_tokens
        released, self.logprobs_sent = self.logprobs[self.logprobs_sent : upto], max(upto, self.logprobs_sent)
        return tuple(released)


def choice_seed(seed: int, index: int) -> int:
    """The random seed of choice ``index`` of a request seeded with ``seed``."""
    return (seed * 1_000_003 + index) % (1 << 63)


class Engine:
    """Serves one causal LM; ``submit`` from any thread, results arrive through each request's sink."""

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 256, batch_wait_s: float = 0.005, seed: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.one_at_a_time = not joins_rows(model)
        self.max_batch, self.max_queue, self.batch_wait_s = 1 if self.one_at_a_time else max_batch, max_queue, batch_wait_s
        self.context_length = context_length(model)
        self.vocab_size = model.get_input_embeddings().num_embeddings  # the token ids a prompt or a logit_bias may name
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters
        self._full_cache = not self.one_at_a_time and has_sliding_layers(model)
        self._unseeded = random.Random(seed)
        self._waiting: list[Request] = []
        self._lock = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # forward passes run (prefills and decode steps); each serves every row in it at once

    # ------------------------------------------------------------------ public

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopped = False
            self._thread = threading.Thread(target=self._run, name="instructrl-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, sink: Sink) -> Request:
        """Queue a request for ``n`` choices; raises QueueFull when ``max_queue`` requests wait already."""
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch}")
        if params.seed is None:
            params = replace(params, seed=self._unseeded.getrandbits(62))
        request = Request(list(prompt_ids), params, n, sink)
        with self._lock:
            self._waiting = [waiting for waiting in self._waiting if not waiting.cancelled.is_set()]  # its client left: no place kept
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"its queue of waiting requests is full ({self.max_queue}); try again later")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def budget(self, prompt_length: int, max_tokens: int | None, default: int) -> int:
        """The tokens a prompt may still generate within the context: ``max_tokens`` (or ``default``), clipped."""
        room = self.context_length - prompt_length
        return max(0, min(room, default if max_tokens is None else max_tokens))

    # ------------------------------------------------------------------ the worker

    def _admit(self, free: int, block: bool) -> list[Request]:
        """Waiting requests that fit in ``free`` rows, oldest first; waits for one when ``block``."""
        with self._lock:
            if block:
                while not self._waiting and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return []
        if block and self.batch_wait_s > 0:
            time.sleep(self.batch_wait_s)  # let requests arriving together share the first step
        with self._lock:
            admitted = []
            while self._waiting and self._waiting[0].n <= free:
                request = self._waiting.pop(0)
                free -= request.n
                if not request.cancelled.is_set():
                    admitted.append(request)
            return admitted

    def _run(self) -> None:
        rows: list[_Row] = []
        cache, mask = None, None
        while not self._stopped:
            admitted = self._admit(self.max_batch - len(rows), block=not rows)
            if self._stopped:
                break
            try:
                if admitted:
                    new_rows, new_cache, new_mask = self._prefill(admitted)
                    rows, cache, mask = rows + new_rows, *self._merge(cache, mask, new_cache, new_mask)
                    rows, cache, mask = self._drop_finished(rows, cache, mask)
                    admitted = []
                if rows:
                    cache, mask = self._decode(rows, cache, mask)
                    rows, cache, mask = self._drop_finished(rows, cache, mask)
            except Exception as err:  # a failed forward pass fails the requests in it, not the server
                for row in rows + [r for request in admitted for r in self._rows_of(request)]:
                    row.request.sink(Event(row.index, f"{type(err).__name__}: {err}", "error", row.generated))
                rows, cache, mask = [], None, None

    def _rows_of(self, request: Request) -> list[_Row]:
        params = request.params
        return [
            _Row(request, i, torch.Generator().manual_seed(choice_seed(params.seed, i)), TextStream(self.tokenizer, params.stop, token_starts=params.logprobs is not None),
                 logprobs=None if params.logprobs is None else [])
            for i in range(request.n)
        ]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, every_position: bool = False):
        """The logits of the last position (B, V), or of ``every_position`` (B, T, V), and the cache."""
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if self._logits_to_keep and not every_position:
            kwargs["logits_to_keep"] = 1
        positions = position_ids_from_mask(mask)[:, -ids.shape[1] :]
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=positions.to(self.device), **kwargs)
        return out.logits if every_position else out.logits[:, -1], out["cache"] if "cache" in out else out["past_key_values"]

    def _empty_cache(self):
        """None (the model builds its own KV cache), or for a model with sliding-window layers a cache
        whose every layer keeps every column, as its full-attention layers do. A sliding layer of its
        own keeps only the window's last columns and counts the rest, so cutting the padding columns
        (``_drop_finished``) or padding a joining batch's (``_merge``) would set it apart from the
        mask; the model's mask still limits each of those layers to its window."""
        from transformers import DynamicCache

        return DynamicCache() if self._full_cache else None

    @torch.no_grad()
    def _prefill(self, requests: list[Request]):
        rows = [row for request in requests for row in self._rows_of(request)]
        prompts = [row.request.prompt_ids for row in rows]
        ids, mask = pad_sequences(prompts, self.pad_id, side="left")
        mask = mask.to(self.device)  # the running batch's mask stays beside its KV cache: no copy per decoded token
        scored = any(request.params.prompt_logprobs for request in requests)
        logits, cache = self._forward(ids, mask, self._empty_cache(), every_position=scored)
        if scored:
            self._send_prompt_logprobs(rows, logits)
            logits = logits[:, -1]
        for row in rows:
            if row.request.params.max_tokens == 0:  # only the prompt is scored: the row leaves the batch unsampled
                self._send(row, Event(row.index, "", "length", 0))
        generating = [b for b, row in enumerate(rows) if row.request.params.max_tokens > 0]
        if generating:
            self._sample([rows[b] for b in generating], logits if len(generating) == len(rows) else logits[generating])
        return rows, cache, mask

    def _send_prompt_logprobs(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each asking request's prompt tokens scored by the (B, T, V) prefill ``logits`` of its first row, sent to every row of it."""
        width = logits.shape[1]
        for b, row in enumerate(rows):
            params = row.request.params
            if not params.prompt_logprobs or row.index != 0:
                continue
            prompt = row.request.prompt_ids
            start = width - len(prompt)  # the row is left-padded: its prompt fills the last columns
            scored = token_logprobs(logits[b, start : width - 1], prompt[1:], [params.logprobs or 0] * (len(prompt) - 1))
            _, offsets = text_offsets(self.tokenizer, prompt)
            entries = tuple(replace(entry, text_offset=offset) for entry, offset in zip([TokenLogprob(prompt[0], None), *scored], offsets))
            for same in rows[b : b + row.request.n]:
                self._send(same, Event(same.index, "", prompt_logprobs=entries))

    @torch.no_grad()
    def _decode(self, rows: list[_Row], cache, mask):
        ids = torch.tensor([[row.next_token] for row in rows], device=self.device)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=mask.device)], dim=1)
        logits, cache = self._forward(ids, mask, cache)
        self._sample(rows, logits)
        return cache, mask

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        self.steps += 1
        tokens = sample_next_tokens(
            _sampling_logits(rows, logits), [r.request.params.temperature for r in rows], [r.request.params.top_p for r in rows], [r.generator for r in rows]
        )
        asking = [b for b, row in enumerate(rows) if row.logprobs is not None]
        scored = dict(zip(asking, token_logprobs(logits[asking], [tokens[b] for b in asking], [rows[b].request.params.logprobs for b in asking]))) if asking else {}
        for b, (row, token) in enumerate(zip(rows, tokens)):
            row.next_token, row.generated = token, row.generated + 1
            if token in self.eos_ids:
                finish, delta = "stop", row.text.finish(end_token=token)
            else:
                delta, stopped = row.text.add(token)
                finish = "stop" if stopped else None
            if b in scored:
                row.logprobs.append(replace(scored[b], text_offset=row.text.starts[-1]))
            if finish is None and row.generated >= row.request.params.max_tokens:
                finish, delta = "length", delta + row.text.finish()
            released = row.released_logprobs()
            if delta or finish or released:
                self._send(row, Event(row.index, delta, finish, row.generated, released))
            if finish:
                row.next_token = -1

    @staticmethod
    def _send(row: _Row, event: Event) -> None:
        if not row.request.cancelled.is_set():
            row.request.sink(event)

    def _drop_finished(self, rows: list[_Row], cache, mask):
        keep = [i for i, row in enumerate(rows) if row.next_token >= 0 and not row.request.cancelled.is_set()]
        if len(keep) == len(rows):
            return rows, cache, mask
        if not keep:
            return [], None, None
        index = torch.tensor(keep, device=self.device)
        mask = mask[index]
        cache.batch_select_indices(index)
        # columns that are padding in every remaining row need no attention any more
        leading = leading_padding(mask)
        if leading:
            mask = mask[:, leading:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, leading:], layer.values[:, :, leading:]
        return [rows[i] for i in keep], cache, mask

    def _merge(self, cache, mask, new_cache, new_mask):
        """The running batch's KV cache and mask followed by a new batch's, both left-padded to one length."""
        if cache is None:
            return new_cache, new_mask
        from transformers import DynamicCache

        width = max(mask.shape[1], new_mask.shape[1])
        layers = [
            (torch.cat([left_pad(a.keys, width, 2), left_pad(b.keys, width, 2)]), torch.cat([left_pad(a.values, width, 2), left_pad(b.values, width, 2)]))
            for a, b in zip(cache.layers, new_cache.layers)
        ]
        return DynamicCache(layers), torch.cat([left_pad(mask, width, 1), left_pad(new_mask, width, 1)])


def _sampling_logits(rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
    """(B, V) ``logits`` with each row's penalties and logit_bias applied; log-probs stay the raw model's (vLLM's default)."""
    adjusting = [b for b, row in enumerate(rows) if row.request.params.adjusts_logits]
    if not adjusting:
        return logits
    adjusted = logits.float().clone()
    for b in adjusting:
        params = rows[b].request.params
        adjusted[b] = adjusted_logits(adjusted[b], rows[b].text.token_ids, params.presence_penalty, params.frequency_penalty, params.logit_bias)
    return adjusted


def joins_rows(model) -> bool:
    """Whether ``model``'s sequences can share a batch that they join and leave at any step: whether each layer
    of its cache holds keys and values by position, which left padding, merging and cutting columns keep exact.
    A recurrent layer's state (Mamba's, LFM2's convolution, Qwen3-Next's linear attention) sums up its sequence,
    padding included, and transformers cannot drop a row of it.
    The cache asked of is the one a forward pass returns: transformers 4.x gives such models a cache class
    of their own, and there ``DynamicCache(config=...)`` would list plain layers for them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = returned_cache(model)
    return isinstance(cache, DynamicCache) and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


@torch.no_grad()
def returned_cache(model):
    """The cache ``model``'s forward pass returns for a prompt of two tokens (None for none). Two, not one:
    transformers 4.x's RecurrentGemma sets up its state only for a prompt longer than one token."""
    out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device), use_cache=True)
    return out.get("past_key_values", out.get("cache"))


def has_sliding_layers(model) -> bool:
    """Whether ``model``'s own KV cache would keep only a window of some layers (Mistral, Gemma 2 and 3, gpt-oss)."""
    from transformers import DynamicCache

    return any(DynamicCache(config=model.config).is_sliding)


def left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros put before it along ``dim`` up to ``width`` (masked out wherever it is read)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _eos_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}

