"""The OpenAI API's request bodies (pydantic) and response objects (plain dicts in its exact shapes).

Fields the server does not use are accepted and ignored, as OpenAI-compatible servers do, so
any client built on the official ``openai`` package works unchanged; fields that ask for what it
does not do (tools and function calls, best_of, a JSON response format, audio, a suffix, and
other servers' sampling options such as vLLM's top_k) are refused (``unsupported``).

Log-probs (chat ``logprobs``/``top_logprobs``, completions ``logprobs``/``echo``) are those of the
model's own distribution, log_softmax of its logits, whatever the temperature, top-p, penalties
and logit_bias a token was sampled with (vLLM's default). The tokens listed are the ones whose
text makes up the returned text (a token that the text keeps part of, before a stop string,
included), and the EOS token that ended an answer (which adds no text); the tokens of a stop
string are not.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Callable, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator

from instructrl.data.jsonl import encodable
from instructrl.data.records import TEMPLATE_ROLES, content_text

if TYPE_CHECKING:
    from instructrl.serve.sampling import TokenLogprob

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # a logit_bias lies in [-100, 100], as OpenAI's
MAX_TOP_LOGPROBS = 20  # OpenAI's for chat; its completions stop at 5, vLLM's at 20 as here
# other servers' sampling options (vLLM's, sent through the openai client's extra_body), each with the
# values that leave sampling as it is: any other value would change the answer, so it is refused
OTHER_SERVERS_OPTIONS = {"top_k": (None, -1, 0), "min_p": (None, 0), "repetition_penalty": (None, 1), "min_tokens": (None, 0),
                         "ignore_eos": (None, False), "stop_token_ids": (None, []), "guided_json": (None,), "guided_regex": (None,),
                         "guided_choice": (None,), "guided_grammar": (None,)}

TokenText = Callable[[int], tuple[str, list[int]]]  # a token id's text and UTF-8 bytes (serve.text.TokenTexts)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[str] = None  # text, or a list of text parts joined (content_text)
    tool_calls: Optional[list] = None  # an assistant's past calls: refused, as tools are
    function_call: Optional[dict] = None

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and self.role != "assistant":  # only an assistant's turn may be calls alone
            raise ValueError(f"a {self.role} message needs content")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        """One clear error for content that is neither text nor a list of text parts (an image, say): as the data files are read."""
        return None if content is None else content_text(content)

    def as_template_message(self) -> dict:
        """The message as a chat template reads it: text content, developer as system."""
        return {"role": TEMPLATE_ROLES[self.role], "content": self.content or ""}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields the chat and completion endpoints share; ``null`` means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="allow")  # kept, to refuse OTHER_SERVERS_OPTIONS; the rest is ignored
    model: str
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    logit_bias: Optional[dict[int, float]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _at_most_four(cls, stop):
        """One clear error for anything but a string or a list of at most four."""
        texts = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(texts, list) and all(isinstance(text, str) for text in texts)):
            raise ValueError(f"must be a string or a list of at most {MAX_STOP_STRINGS} strings")
        if len(texts or []) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        for text in texts or []:
            encodable(text, "a stop string")
        return stop

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_biases(cls, bias):
        """One clear error for anything but {token id: bias in [-100, 100]} (JSON writes the ids as strings)."""
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"must map token ids to biases, as {{\"50256\": -100}}, not {type(bias).__name__}")
        for token, value in bias.items():
            if not (isinstance(token, int) or (isinstance(token, str) and token.strip().isdigit())):
                raise ValueError(f"{token!r} is not a token id")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {token} must be a number from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}, not {value!r}")
        return bias

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(param, reason) for a field set to ask for what this server does not do; silently ignoring it would change the answer's meaning."""
        for name, value in (self.model_extra or {}).items():
            if name in OTHER_SERVERS_OPTIONS and value not in OTHER_SERVERS_OPTIONS[name]:
                return name, f"{name} is not an OpenAI parameter and this server does not implement it"
        return None

    def logprobs_asked(self) -> Optional[int]:
        """How many alternatives to list beside each generated token's log-prob; None: no log-probs."""
        return None

    def scores_prompt(self) -> bool:
        return False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((self.logit_bias or {}).items()))

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list] = None
    functions: Optional[list] = None  # the deprecated form of tools
    tool_choice: Union[str, dict, None] = None
    function_call: Union[str, dict, None] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict] = None
    response_format: Optional[dict] = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top_logprobs, info: ValidationInfo):
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top_logprobs

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_asked(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> Optional[tuple[str, str]]:
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, f"{name} (function calling) are not supported"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                return name, f"{name} {getattr(self, name)!r} asks for a function call; function calling is not supported"
        for i, message in enumerate(self.messages):
            if message.tool_calls or message.function_call:
                param = f"messages.{i}.{'tool_calls' if message.tool_calls else 'function_call'}"
                return param, f"message {i} holds function calls; function calling is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", f"response_format {self.response_format.get('type')!r} is not supported; only 'text'"
        if self.audio is not None or any(m != "text" for m in self.modalities or []):
            return "audio" if self.audio is not None else "modalities", "only text output is supported"
        return super().unsupported()


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(union_mode="left_to_right")
    max_tokens: Optional[int] = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Optional[bool] = None
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_or_tokens(cls, prompt):
        """One clear error for a prompt that is not text, token ids, or a list of either."""
        if isinstance(prompt, str) or _token_ids(prompt):
            return encodable(prompt, "the prompt") if isinstance(prompt, str) else prompt
        if not isinstance(prompt, list):
            raise ValueError(f"must be a string, a list of strings, or token ids, not {type(prompt).__name__}")
        for i, one in enumerate(prompt):
            if isinstance(one, str):
                encodable(one, f"prompt {i}")
            elif not _token_ids(one):
                raise ValueError(f"prompt {i} must be a string or a list of token ids (integers)")
        return prompt

    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str) or _token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)

    def token_limit(self) -> Optional[int]:
        return self.max_tokens

    def logprobs_asked(self) -> Optional[int]:
        return self.logprobs

    def scores_prompt(self) -> bool:
        return bool(self.echo) and self.logprobs is not None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.best_of is not None and self.best_of > 1:
            return "best_of", "best_of is not supported; use n"
        if self.suffix:
            return "suffix", "suffix (text to insert before) is not supported"
        return super().unsupported()


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    """A chat choice's (or chunk's) ``logprobs``: each token with its bytes and its most likely alternatives."""

    def token(token_id: int, logprob: float) -> dict:
        text, raw = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**token(e.token_id, e.logprob), "top_logprobs": [token(t, lp) for t, lp in e.top]} for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    """A text completion's (or chunk's) ``logprobs`` in OpenAI's legacy shape: each alternatives' dict
    holds the token itself too (up to logprobs + 1 entries, as OpenAI's), none for a prompt's first token."""
    tokens = [token_text(e.token_id)[0] for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {**{token_text(t)[0]: lp for t, lp in e.top}, text: e.logprob} for e, text in zip(entries, tokens)],
        "text_offset": [e.text_offset for e in entries],
    }


def chat_completion(id: str, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
                    logprobs: Optional[list[dict]] = None) -> dict:
    logprobs = logprobs or [None] * len(texts)
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model, "system_fingerprint": None,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": reason}
            for i, (text, reason, lp) in enumerate(zip(texts, finish_reasons, logprobs))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(id: str, model: str, created: int, index: int | None = None, delta: dict | None = None,
               finish_reason: str | None = None, with_usage: bool = False, usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    """A ``chat.completion.chunk``; ``index=None`` makes the closing usage chunk (no choices)."""
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
             "choices": [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def text_completion(id: str, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
                    logprobs: Optional[list[dict]] = None) -> dict:
    logprobs = logprobs or [None] * len(texts)
    return {
        "id": id, "object": "text_completion", "created": int(time.time()), "model": model, "system_fingerprint": None,
        "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
                    for i, (text, reason, lp) in enumerate(zip(texts, finish_reasons, logprobs))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(id: str, model: str, created: int, index: int | None = None, text: str = "",
                     finish_reason: str | None = None, with_usage: bool = False, usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
             "choices": [] if index is None else [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "instructrl"}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
