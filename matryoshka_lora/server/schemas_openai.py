"""OpenAI-compatible bodies: /v1/completions, /v1/chat/completions, /v1/models.

`model` is `ADAPTER`, `ADAPTER@RANK` or the base model's name. Extra fields an OpenAI client may send
are ignored, except ours: `rank` and `latency_budget_ms` (the openai client sends them via `extra_body`).
Answers carry an extra `matryoshka` object: the adapter, the rank served and why, and the timings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from matryoshka_lora.server.schemas import (
    RANK_XOR_BUDGET,
    ChatMessage,
    RankReason,
    SamplingFields,
    Timings,
    body_rules,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_model(model: str, base_name: str) -> tuple[str | None, int | None]:
    """`model` -> (adapter, rank): base name -> (None, None); "A@8" -> ("A", 8); "A" -> ("A", None);
    "BASE@8" -> (None, 8), which routes_openai.job_of refuses (the base model has no rank)."""
    if model == base_name:
        return None, None
    name, sep, rank = model.rpartition("@")
    if sep and name and rank.isdigit():
        return (None if name == base_name else name), int(rank)
    return model, None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class OpenAIRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=body_rules(RANK_XOR_BUDGET))

    model: str = Field(min_length=1, max_length=200, description="ADAPTER, ADAPTER@RANK, or the base model's name.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="OpenAI's default 1; 0 = greedy.")
    n: int = Field(1, ge=1, le=1, description="Only 1 choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(OpenAIRequest):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="One non-empty prompt (a list must hold exactly one).")
    max_tokens: int | None = Field(
        None, ge=1, description=f"Default {DEFAULT_COMPLETION_MAX_TOKENS}, or this server's max_output_tokens if lower."
    )
    echo: bool = Field(False, description="Not supported: must be false.", json_schema_extra={"const": False})
    logprobs: None = Field(None, description="Not supported: must be null.")

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated OpenAI name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: this server's max_output_tokens.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MatryoshkaInfo(BaseModel):
    adapter: str | None
    rank: int
    rank_reason: RankReason
    timings: Timings | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    matryoshka: MatryoshkaInfo | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    matryoshka: MatryoshkaInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    matryoshka: MatryoshkaInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "matryoshka-lora"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
