"""The OpenAI-compatible HTTP API over one Engine per served model (FastAPI).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{name}`` and ``GET /health``. Every error answers with OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: 400 for a request the model cannot serve,
or whose body does not match the schema (as OpenAI answers), 401 for a missing or wrong API key,
404 for an unknown model or route, 429 when the engine's queue is full, 500 when generation fails.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructrl.data.chat import control_token_in, control_tokens, render_text
from instructrl.errors import UserError
from instructrl.serve import schemas
from instructrl.serve.engine import Engine, Event, QueueFull, SamplingParams
from instructrl.serve.text import TokenTexts

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, schemas.error_body(message, type, param, code), headers


# -- errors: every one in OpenAI's body


async def _api_error(request: Request, err: APIError):
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


async def _invalid(request: Request, err: RequestValidationError):
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":  # loc is ("body", character offset)
        where = f" at character {loc[0]}" if loc else ""
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return JSONResponse(schemas.error_body(f"the request body is not valid JSON: {reason}{where}", "invalid_request_error", None, "invalid_json"), 400)
    param = ".".join(loc) or None
    reason = str(first.get("msg")).removeprefix("Value error, ")
    if param is None:  # the body as a whole: empty, or not a JSON object
        kind = request.headers.get("content-type", "none")
        reason = f"the request body must be a JSON object, sent with Content-Type: application/json (got {kind})"
    message = f"{param}: {reason}" if param else reason
    return JSONResponse(schemas.error_body(message, "invalid_request_error", param, first.get("type")), 400)


async def _http(request: Request, err: StarletteHTTPException):
    if err.status_code == 400:  # FastAPI's one 400: a body it could not parse (not UTF-8, or JSON nested too deep), the reason its cause
        reason = err.__cause__ or err.detail
        return JSONResponse(schemas.error_body(f"the request body is not valid JSON: {reason}", "invalid_request_error", None, "invalid_json"), 400)
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(schemas.error_body(f"{request.method} {request.url.path}: {err.detail}", kind, None, None), err.status_code)


async def _crash(request: Request, err: Exception):
    return JSONResponse(schemas.error_body(f"internal error: {type(err).__name__}: {err}", "server_error", None, None), 500)


ERROR_HANDLERS = {APIError: _api_error, RequestValidationError: _invalid, StarletteHTTPException: _http, Exception: _crash}


def create_app(engines: dict[str, Engine], api_key: Optional[str] = None, default_max_tokens: int = 256) -> FastAPI:
    """The API serving ``engines`` by name; with ``api_key``, /v1 routes need ``Authorization: Bearer KEY``.

    The engines start with the app and stop with it.
    """
    created = int(time.time())
    token_texts = {name: TokenTexts(engine.tokenizer) for name, engine in engines.items()}

    async def lifespan(app: FastAPI):
        for engine in engines.values():
            engine.start()
        yield
        for engine in engines.values():
            engine.stop()

    app = FastAPI(title="instructrl", lifespan=lifespan, exception_handlers=ERROR_HANDLERS)

    # ------------------------------------------------------------------ auth, models

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'", "authentication_error", None, "invalid_api_key")

    def engine_for(name: str) -> Engine:
        if name not in engines:
            raise APIError(404, f"the model '{name}' does not exist; served: {', '.join(engines)}", "invalid_request_error", "model", "model_not_found")
        return engines[name]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(engines)}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [schemas.model_card(name, created) for name in engines]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def get_model(name: str):
        engine_for(name)
        return schemas.model_card(name, created)

    # ------------------------------------------------------------------ generation

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        engine = engine_for(body.model)
        refuse_unsupported(body)
        prompt = _chat_prompt(engine, body)
        job = _submit(engine, [prompt], body, default_max_tokens, ["messages"])
        id = schemas.new_id("chatcmpl")
        logprobs = (lambda entries: schemas.chat_logprobs(entries, token_texts[body.model])) if body.logprobs else None
        if body.stream:
            return _sse(_chat_stream(job, id, body.model, body.include_usage(), logprobs), job)
        choices = await job.collect(request)
        return schemas.chat_completion(id, body.model, [c.text for c in choices], [c.finish_reason for c in choices], job.prompt_tokens,
                                       job.completion_tokens, logprobs and [logprobs(c.logprobs) for c in choices])

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: schemas.CompletionRequest, request: Request):
        engine = engine_for(body.model)
        refuse_unsupported(body)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it is for scoring the prompt, with echo: true", param="max_tokens")
        prompts, params = _completion_prompts(engine, body)
        job = _submit(engine, prompts, body, default_max_tokens, params)
        id = schemas.new_id("cmpl")
        # choice i answers prompt i // n; with echo its text begins with the prompt's
        echoes = [p if isinstance(p, str) else engine.tokenizer.decode(p, skip_special_tokens=True) for p in body.prompts()] if body.echo else None
        logprobs = (lambda entries: schemas.completion_logprobs(entries, token_texts[body.model])) if body.logprobs is not None else None
        if body.stream:
            return _sse(_completion_stream(job, id, body.model, body.include_usage(), echoes, logprobs), job)
        choices = await job.collect(request)
        prefixes = [echoes[i // job.n] if echoes else "" for i in range(len(choices))]
        return schemas.text_completion(
            id, body.model, [prefix + c.text for prefix, c in zip(prefixes, choices)], [c.finish_reason for c in choices],
            job.prompt_tokens, job.completion_tokens,
            logprobs and [logprobs([*c.prompt_logprobs, *shifted(c.logprobs, len(prefix))]) for prefix, c in zip(prefixes, choices)],
        )

    return app


@dataclass
class _Choice:
    """One choice's whole answer, gathered from its events."""

    text: str = ""
    finish_reason: str = ""
    logprobs: list = field(default_factory=list)
    prompt_logprobs: tuple = ()


def shifted(entries, by: int) -> list:
    """Log-prob entries whose text comes ``by`` characters later in the returned text (after an echoed prompt)."""
    return [replace(e, text_offset=e.text_offset + by) for e in entries] if by else list(entries)


class _Job:
    """The engine requests of one API call (one per prompt, n choices each) and their events in one queue.

    Choice ``j`` of prompt ``p`` is choice ``p * n + j`` of the response.
    """

    def __init__(self, n: int, prompt_tokens: int):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.n, self.prompt_tokens = n, prompt_tokens
        self.requests = []
        self.tokens: dict[int, int] = {}
        self.unfinished = 0

    def sink_for(self, offset: int):
        def sink(event: Event) -> None:  # called on the engine's thread
            self.loop.call_soon_threadsafe(self.events.put_nowait, replace(event, index=offset + event.index))
        return sink

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens.values())

    async def next(self) -> Event:
        event = await self.events.get()
        self.tokens[event.index] = event.completion_tokens
        if event.finish_reason == "error":
            self.cancel()
            raise APIError(500, f"generation failed: {event.text}", "server_error", None, None)
        if event.finish_reason:
            self.unfinished -= 1
        return event

    async def collect(self, request: Request) -> list[_Choice]:
        """Every choice's whole answer; gives up if the client goes away."""
        choices = [_Choice() for _ in range(self.unfinished)]
        try:
            while self.unfinished:
                try:
                    event = await asyncio.wait_for(self.next(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "client disconnected") from None
                    continue
                choice = choices[event.index]
                choice.text += event.text
                choice.finish_reason = event.finish_reason or choice.finish_reason
                choice.logprobs += event.logprobs
                choice.prompt_logprobs = event.prompt_logprobs or choice.prompt_logprobs
        finally:
            if self.unfinished:
                self.cancel()
        return choices

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()


def _chat_prompt(engine: Engine, body: schemas.ChatCompletionRequest) -> list[int]:
    """The token ids of ``body.messages`` in the model's chat template, ending where the assistant's turn begins."""
    if engine.tokenizer.chat_template is None:
        raise APIError(400, f"the model '{body.model}' has no chat template; use /v1/completions", param="messages")
    messages, tokens = [m.as_template_message() for m in body.messages], control_tokens(engine.tokenizer)
    for i, message in enumerate(messages):  # such a token in the text would act as one: a turn of the client's making
        special = control_token_in(message["content"], tokens)
        if special is not None:
            raise APIError(400, f"message {i} holds the model's control token {special!r}", param=f"messages.{i}.content")
    try:
        text = render_text(engine.tokenizer, messages, add_generation_prompt=True)
    except UserError as err:  # e.g. a system turn to a model whose template has none
        raise APIError(400, str(err), param="messages", code="unsupported") from None
    for i, message in enumerate(messages):  # a template may leave out roles it does not know (tool results, say)
        if message["content"].strip() not in text:
            raise APIError(400, f"the chat template of '{body.model}' leaves out message {i} (role '{message['role']}')",
                           param=f"messages.{i}", code="unsupported")
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _completion_prompts(engine: Engine, body: schemas.CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """The token ids of each prompt in ``body`` (text or ids), and the name of each in errors: ``prompt`` or ``prompt.i``."""
    given = body.prompts()
    if not given:
        raise APIError(400, "give at least one prompt", param="prompt")
    params = ["prompt"] if len(given) == 1 else [f"prompt.{i}" for i in range(len(given))]
    prompts = [engine.tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in given]
    for param, prompt in zip(params, prompts):
        if not prompt:
            raise APIError(400, "the prompt is empty", param=param)
        if not all(0 <= t < engine.vocab_size for t in prompt):
            raise APIError(400, f"token ids must be in [0, {engine.vocab_size})", param=param)
    return prompts, params


def refuse_unsupported(body: schemas.SamplingRequest) -> None:
    if (unsupported := body.unsupported()) is not None:
        raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported")


def _submit(engine: Engine, prompts: list[list[int]], body: schemas.SamplingRequest, default_max_tokens: int, prompt_params: list[str]) -> _Job:
    """Queue every prompt's n choices, once all of them are known to fit; ``prompt_params`` name the prompts in errors."""
    n = body.n or 1
    if n * len(prompts) > engine.max_batch:
        why = f" (the model '{body.model}' has recurrent layers: it is served one sequence at a time)" if engine.one_at_a_time else ""
        raise APIError(400, f"n x prompts = {n * len(prompts)} is more than this server's batch of {engine.max_batch}{why}", param="n")
    budgets = [engine.budget(len(prompt), body.token_limit(), default_max_tokens) for prompt in prompts]
    room_needed = 0 if body.token_limit() == 0 else 1  # max_tokens 0 scores the prompt: it only has to fit
    for prompt, param in zip(prompts, prompt_params):
        if len(prompt) + room_needed > engine.context_length:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; the model's context is {engine.context_length}",
                           param=param, code="context_length_exceeded")
    for token, _ in body.token_biases():
        if not 0 <= token < engine.vocab_size:
            raise APIError(400, f"logit_bias: token id {token} is not in [0, {engine.vocab_size})", param="logit_bias")
    job = _Job(n, sum(len(p) for p in prompts))
    for p, (prompt, budget) in enumerate(zip(prompts, budgets)):
        params = SamplingParams(
            max_tokens=budget, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop_strings(), seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0, logit_bias=body.token_biases(),
            logprobs=body.logprobs_asked(), prompt_logprobs=body.scores_prompt(),
        )
        try:
            job.requests.append(engine.submit(prompt, params, n, job.sink_for(p * n)))
        except QueueFull as err:
            job.cancel()
            raise APIError(429, f"the server is busy: {err}", "rate_limit_error", None, "queue_full", {"Retry-After": "1"}) from None
        job.unfinished += n
    return job


def _sse(chunks: AsyncIterator[dict], job: _Job) -> StreamingResponse:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``; a client that leaves cancels the job."""

    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as err:
            yield f"data: {json.dumps(err.body)}\n\n"
        finally:
            job.cancel()  # a no-op once every choice finished; frees the rows of a client that left
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_stream(job: _Job, id: str, model: str, include_usage: bool, logprobs) -> AsyncIterator[dict]:
    """Chat chunks; ``logprobs`` (entries -> their ``logprobs`` object, or None) puts each token's beside its text."""
    created = int(time.time())
    for index in range(job.unfinished):
        yield schemas.chat_chunk(id, model, created, index, {"role": "assistant", "content": ""}, with_usage=include_usage)
    while job.unfinished:
        event = await job.next()
        if event.text or event.logprobs:
            yield schemas.chat_chunk(id, model, created, event.index, {"content": event.text}, with_usage=include_usage,
                                     logprobs=logprobs and logprobs(event.logprobs))
        if event.finish_reason:
            yield schemas.chat_chunk(id, model, created, event.index, {}, event.finish_reason, with_usage=include_usage)
    if include_usage:
        yield schemas.chat_chunk(id, model, created, None, with_usage=True, usage_=schemas.usage(job.prompt_tokens, job.completion_tokens))


async def _completion_stream(job: _Job, id: str, model: str, include_usage: bool, echoes: Optional[list[str]], logprobs) -> AsyncIterator[dict]:
    """Completion chunks; with ``echoes`` each choice's first is its prompt's text (with the prompt's log-probs when asked)."""
    created = int(time.time())
    echoed: set[int] = set()
    while job.unfinished:
        event = await job.next()
        prefix = echoes[event.index // job.n] if echoes else ""
        if echoes and event.index not in echoed:  # the engine's first event of a choice brings its prompt's log-probs
            echoed.add(event.index)
            yield schemas.completion_chunk(id, model, created, event.index, prefix, with_usage=include_usage,
                                           logprobs=logprobs and logprobs(event.prompt_logprobs))
        if event.text or event.finish_reason or event.logprobs:
            yield schemas.completion_chunk(id, model, created, event.index, event.text, event.finish_reason, with_usage=include_usage,
                                           logprobs=logprobs and logprobs(shifted(event.logprobs, len(prefix))))
    if include_usage:
        yield schemas.completion_chunk(id, model, created, None, with_usage=True, usage_=schemas.usage(job.prompt_tokens, job.completion_tokens))


class BackgroundServer:
    """uvicorn serving ``app`` on a thread of this process (tests and benchmarks); ``with`` starts and stops it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="instructrl-server", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
