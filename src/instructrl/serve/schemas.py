"""The OpenAI API's request bodies (pydantic) and response objects (plain dicts in its exact shapes).

Fields the server does not use are accepted and ignored, as OpenAI-compatible servers do, so
any client built on the official ``openai`` package works unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        """One clear error for content that is neither text nor a list of text parts (an image, say)."""
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError(f"must be a string or a list of text parts, not {type(content).__name__}")
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"part {i} is of type {kind!r}; only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} needs a 'text' string")
        return content

    def as_template_message(self) -> dict:
        """The message as a chat template reads it: text content (parts joined), developer as system."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields the chat and completion endpoints share; ``null`` means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_limit(self) -> Optional[int]:
        return self.max_tokens


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model, "system_fingerprint": None,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(zip(texts, finish_reasons))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(id: str, model: str, created: int, index: int | None = None, delta: dict | None = None,
               finish_reason: str | None = None, with_usage: bool = False, usage_: dict | None = None) -> dict:
    """A ``chat.completion.chunk``; ``index=None`` makes the closing usage chunk (no choices)."""
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
             "choices": [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def text_completion(id: str, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": id, "object": "text_completion", "created": int(time.time()), "model": model, "system_fingerprint": None,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, finish_reasons))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(id: str, model: str, created: int, index: int | None = None, text: str = "",
                     finish_reason: str | None = None, with_usage: bool = False, usage_: dict | None = None) -> dict:
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
             "choices": [] if index is None else [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "instructrl"}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
