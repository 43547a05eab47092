"""The HTTP request and response bodies (pydantic), as published in the OpenAPI schema.

Requests are validated strictly (no "8" for 8, unknown fields of /generate are errors); cross-field
rules (prompt xor messages, rank xor latency budget, a rank needs an adapter) are checked here too, so
every bad body is a 4xx, and each is stated in the schema as well (`allOf` of the rules below), so that
clients and fuzzers see what the server enforces.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_STRINGS = 8
DEFAULT_GENERATE_MAX_TOKENS = 64


def given(name: str) -> dict:
    """JSON Schema: the body has `name` and it is not null."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def not_null(name: str) -> dict:
    """JSON Schema: `name` is absent or null."""
    return {"properties": {name: {"type": "null"}}}


RANK_XOR_BUDGET = {"not": {"allOf": [given("rank"), given("latency_budget_ms")]}}
PROMPT_XOR_MESSAGES = {"oneOf": [given("prompt"), given("messages")]}
RANK_NEEDS_ADAPTER = {"anyOf": [given("adapter"), {"allOf": [not_null("rank"), not_null("latency_budget_ms")]}]}


def body_rules(*rules: dict) -> dict:
    """A model's `json_schema_extra`: its cross-field rules, as the validators below check them."""
    return {"allOf": list(rules)}


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. invalid_rank, adapter_not_found, rate_limited.")
    message: str = Field(description="What was wrong, in words.")
    given: Any = Field(None, description="The offending value, when there is one.")
    allowed: Any = Field(None, description="What would have been accepted.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] = Field(description="Text, or OpenAI content parts ({type: text, text}).")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class SamplingFields(BaseModel):
    """Fields shared by /generate and the OpenAI routes."""

    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible.")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Stop strings (at most {MAX_STOP_STRINGS})."
    )
    rank: int | None = Field(None, ge=1, description="Serve the adapter at this rank (1..r_max).")
    latency_budget_ms: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Instead of a rank: the highest rank predicted to finish within this budget.",
    )
    ignore_eos: bool = Field(
        False, description="Keep generating past EOS up to max_tokens (benchmarks; vLLM's extension of the OpenAI API)."
    )

    @model_validator(mode="after")
    def _check_common(self):
        if self.rank is not None and self.latency_budget_ms is not None:
            raise ValueError("give either rank or latency_budget_ms, not both")
        return self

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra=body_rules(RANK_XOR_BUDGET, PROMPT_XOR_MESSAGES, RANK_NEEDS_ADAPTER),
    )

    prompt: str | None = Field(None, min_length=1, description="Raw prompt text (or give `messages`).")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat messages, rendered with the model's chat template (or give `prompt`)."
    )
    adapter: str | None = Field(None, min_length=1, max_length=128, description="Adapter name; none = the base model.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description=f"Tokens to generate at most; default {DEFAULT_GENERATE_MAX_TOKENS}, or this server's max_output_tokens if lower.",
    )
    stream: bool = Field(False, description="Server-sent events, one per token.")

    @model_validator(mode="after")
    def _check_generate(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.adapter is None and (self.rank is not None or self.latency_budget_ms is not None):
            raise ValueError("rank and latency_budget_ms need an adapter: the base model has no rank")
        return self


class Timings(BaseModel):
    queue_ms: float | None = Field(None, description="Enqueue to first scheduled.")
    ttft_ms: float | None = Field(None, description="Enqueue to first token.")
    total_ms: float | None = Field(None, description="Enqueue to finish.")
    predicted_latency_ms: float | None = Field(None, description="The cost model's prediction (budgeted requests).")


RankReason = Literal["requested", "budget", "budget_unmet", "base", "default"]
FinishReason = Literal["stop", "length", "abort", "error"]


class GenerateResponse(BaseModel):
    id: str
    model: str = Field(description="The base model.")
    adapter: str | None
    rank: int = Field(description="The rank served (0 = base model).")
    rank_reason: RankReason = Field(
        description="requested | budget (highest rank predicted within the budget) | "
        "budget_unmet (none predicted within it: the lowest) | base | default (r_max)"
    )
    text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    latency_budget_ms: float | None = None
    timings: Timings


class StreamEvent(BaseModel):
    """One SSE `data:` line of a streamed /generate: type start (rank decided), token (text), done, error."""

    type: Literal["start", "token", "done", "error"]
    id: str
    text: str | None = None
    adapter: str | None = None
    rank: int | None = None
    rank_reason: RankReason | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int | None = None
    num_output_tokens: int | None = None
    timings: Timings | None = None
    error: ErrorDetail | None = None


class AdapterView(BaseModel):
    name: str
    r_max: int
    train_ranks: list[int]
    method: str
    scaling: str
    base_model: str
    target_modules: list[str]
    accuracy: dict[str, float] | None = Field(None, description="Accuracy per rank, from the manifest's eval_results.")
    eval_results: dict[str, Any] | None = None
    path: str | None = Field(None, description="Where it was loaded from (admin answers only).")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterView]


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    path: str = Field(min_length=1, description="Adapter directory on the server's filesystem.")
    name: str | None = Field(None, min_length=1, description="Serve it under this name; default: its manifest name.")


class UnloadAdapterResponse(BaseModel):
    name: str
    unloaded: bool = True


class HealthResponse(BaseModel):
    status: Literal["ok", "ready"]
    model: str | None = None
