"""The OpenAI wire format: request models (pydantic, strict), response bodies, and the error body.

Requests are validated strictly, as OpenAI does: a field of the wrong JSON type is refused (no "1" for 1,
no true for 1), and so is an unknown field. Fields that OpenAI knows but this server cannot honour
(logprobs, penalties, tools, ...) are accepted only at their neutral value, else refused by name, so a
client never gets a silently different behaviour. `top_k` and `ignore_eos` are the vLLM extensions.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP = 4  # OpenAI's limit on stop strings


class APIError(Exception):
    """An error answered with `{"error": {"message", "type", "param", "code"}}` and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field (dotted path: messages.0.role)."""
    errors = e.errors(include_url=False)
    err = errors[0]
    loc = _field_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {loc}", param=loc, code="unknown_parameter")
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: {loc}", param=loc, code="missing_required_parameter")
    # a union (stop: str | list[str]) reports one error per member at the same field: say them all
    msgs = dict.fromkeys(x["msg"] for x in errors if _field_path(x["loc"]) == loc)
    return bad_request(f"Invalid value for {loc or 'the request body'}: {' or '.join(msgs)}", param=loc or None,
                       code="invalid_value")


def _field_path(loc) -> str:
    """messages.0.role from pydantic's location, without the union members' tags (str, list[int], ...)."""
    tags = {"str", "int", "float", "bool", "none", "dict", "list", "TextPart", "StreamOptions", "Message"}
    return ".".join(str(p) for p in loc if isinstance(p, int) or (p not in tags and not any(c in p for c in "[-(")))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Known to OpenAI, not implemented here: accepted only when absent or at the value that changes nothing.
_NEUTRAL = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
            "best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
            "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
            "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
            "response_format": (None, {"type": "text"}), "n": (None, 1)}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's range and default
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 and -1 are off
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # vLLM's extension: do not stop at end-of-text tokens
    user: str | None = None  # accepted and ignored, as by every local server
    n: int | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check(self):
        for name, neutral in _NEUTRAL.items():
            if name in type(self).model_fields:
                v = getattr(self, name)
                if not any(v == x and type(v) is type(x) for x in neutral if x is not None) and v is not None:
                    raise bad_request(f"{name}={v!r} is not supported by this server"
                                      + (" (only n=1)" if name == "n" else ""), param=name, code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} stop strings, got {len(self.stop)}", param="stop")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    # a string, or one prompt's token ids; a list of several prompts (a batch) is refused like n > 1
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request(f"prompt: one prompt per request (got a batch of {len(p)})", param="prompt")
            p = p[0]
        if not p:
            raise bad_request("prompt is empty", param="prompt")
        return p


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens; both work
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- response bodies ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def completion_body(rid: str, model: str, text: str, finish: str | None, created: int, use: dict | None = None,
                    chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish: str, created: int, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
               use: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def now() -> int:
    return int(time.time())
