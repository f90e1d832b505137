"""Request bodies of the OpenAI-compatible endpoints (the subset this server honours) and the error shape.

Fields we cannot honour (n > 1, logprobs, penalties, tools, ...) are refused with a 400 rather than ignored,
so a client never gets an answer to a different question than it asked."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "functions", "function_call",
               "response_format", "best_of", "echo", "suffix")
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "n": 1}   # accepted only at their no-op value


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: StrictStr | list[StrictStr] | None = Field(None, max_length=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _refuse_what_we_cannot_honour(self):
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False):
                raise ValueError(f"'{name}' is not supported by this server; leave it out")
        for name, neutral in NEUTRAL.items():
            if extra.get(name) not in (None, neutral):
                raise ValueError(f"'{name}' other than {neutral} is not supported by this server")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: StrictStr | list[int] | list[StrictStr]

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) \
                and len(self.prompt) != 1:
            raise ValueError("give one prompt per request (a string, or a list of token ids)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("the prompt is empty")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16   # OpenAI's default for completions


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
