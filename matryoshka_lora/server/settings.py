"""ServerSettings: every knob of `matryoshka-lora serve`, validated once where it enters.

Precedence: command-line flags > environment (`MATRYOSHKA_<NAME>`, e.g. `MATRYOSHKA_PORT=9000`)
> defaults. List settings (`adapters`) read from the environment split on commas.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from matryoshka_lora.engine.config import ADAPTER_DTYPES, BUDGET_LAYERS, KV_CACHE_DTYPES, WEIGHT_FORMATS
from matryoshka_lora.errors import ConfigError

SHIPPED_ADAPTERS_DIR = Path("adapters")


def default_adapter_dirs() -> list[Path]:
    """The repo's top-level `adapters/` folder of shipped adapters, when it exists in the working directory."""
    return [SHIPPED_ADAPTERS_DIR] if SHIPPED_ADAPTERS_DIR.is_dir() else []


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseSettings):
    """The HTTP server's settings. `tenants=None` runs the server open (no API keys): allowed on a
    loopback host only, unless `allow_open` says that exposing it is intended."""

    model_config = SettingsConfigDict(
        env_prefix="MATRYOSHKA_", env_ignore_empty=True, extra="forbid", validate_default=True
    )

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 = any free port).")
    model: str | None = Field(None, description="Local Hugging Face model directory; None = the embedded default.")
    adapters: Annotated[list[Path], NoDecode] = Field(
        default_factory=default_adapter_dirs,
        description="Adapter directories (a directory of adapter directories loads each); default: ./adapters.",
    )
    tenants: Path | None = Field(None, description="Tenants file (TOML or YAML); None = open server.")
    allow_open: bool = Field(False, description="Allow an open server (no tenants file) on a non-loopback host.")
    backend: Literal["native", "vllm", "auto"] = Field(
        "native", description="Engine: native (CPU), vllm (GPU), auto (vllm when importable with CUDA, else native)."
    )
    max_num_seqs: int = Field(32, ge=1, description="Requests running at once in the engine.")
    max_queue_len: int = Field(256, ge=1, description="Requests waiting in the engine before it answers 503.")
    max_loras: int = Field(4, ge=1, description="vLLM backend: distinct (adapter, rank) pairs one batch may hold.")
    max_model_len: int | None = Field(
        None, ge=2, description="Prompt + output tokens per request; None = engine default."
    )
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest accepted prompt, in tokens (longer: 413).")
    max_output_tokens: int = Field(1024, ge=1, description="Largest accepted max_tokens of a request (larger: 422).")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest accepted request body, in bytes (larger: 413)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On shutdown, how long in-flight requests may take to finish."
    )
    num_threads: int | None = Field(None, ge=1, description="Torch threads of the engine; None = torch's default.")
    fused_kernels: bool = Field(
        True,
        description="Native engine: the linears, decode LoRA groups, RMSNorm, RoPE + KV write and decode attention as C "
        "kernels (built once with the system C compiler; torch ops when there is none).",
    )
    weight_format: Literal[WEIGHT_FORMATS] = Field(
        "auto",
        description="Native engine with the C kernels: compute the base linears on the GGUF file's own Q4_1 / "
        "Q8_0 blocks (gguf: the same results as float32 with ~5.6x fewer bytes per decode step), on the blocks for "
        "steps of few rows and a packed bfloat16 copy for wide ones (gguf+bf16: prefill and many sequences on the "
        "CPU's AMX tiles, ~0.3 % error per linear), on float32 panels (float32, the reference), or on gguf+bf16 "
        "where the CPU has AMX, else the blocks, where the model has a GGUF file (auto).",
    )
    adapter_dtype: Literal[ADAPTER_DTYPES] = Field(
        "auto",
        description="Native engine: store the adapters' weights as saved (auto: bfloat16 for an adapter saved in "
        "bfloat16, else float32) or rounded to bfloat16 at load (bfloat16: half the bytes a decode step reads "
        "of a float32 adapter; each weight within 2^-9 of itself).",
    )
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field(
        "auto",
        description="Native engine: the KV cache in float32 (auto) or bfloat16 (half its memory and of the bytes "
        "a decode step reads per token of context; K and V rounded as they are written).",
    )
    budget_unmet: Literal["serve", "refuse"] = Field(
        "serve",
        description="A request whose latency budget no rank is predicted to meet: serve it at the lowest "
        "rank and say so (rank_reason budget_unmet), or refuse it with 503 + Retry-After so that the load stays "
        "within what the admitted budgets allow (shedding by deadline). Refuse sheds only what even the typical "
        "case (the median of observed / predicted latency) would serve late; the rest is served at the lowest rank.",
    )
    budget_layers_off: Annotated[list[Literal[BUDGET_LAYERS]], NoDecode] = Field(
        default_factory=list,
        description="Native engine, for A/B runs of the budget controller (environment only, "
        "MATRYOSHKA_BUDGET_LAYERS_OFF=typical,headroom): typical = refuse decides on the margin's prediction, "
        "not the typical one; headroom = the highest rank that fits, whatever it leaves the next request.",
    )
    seed: int = Field(0, description="Seed of requests that carry none.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Log level (debug: each budget decision's terms and each budgeted request's real latency).",
    )
    access_log: bool = Field(True, description="Log one line per HTTP request (uvicorn's access log, at info).")

    @field_validator("adapters", "budget_layers_off", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("adapters")
    @classmethod
    def _adapters_exist(cls, value: list[Path]) -> list[Path]:
        missing = [str(p) for p in value if not p.is_dir()]
        if missing:
            raise ValueError(f"adapter directories not found: {missing}")
        return value

    @field_validator("tenants")
    @classmethod
    def _tenants_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"tenants file not found: {value}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _refuse_open_exposure(self) -> ServerSettings:
        if self.tenants is None and not self.allow_open and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve without a tenants file on non-loopback host {self.host!r}: "
                "pass --tenants FILE, bind 127.0.0.1, or pass --allow-open to expose an open server on purpose"
            )
        return self


def load_settings(**overrides) -> ServerSettings:
    """Build settings from `overrides` (e.g. CLI flags; None values are ignored) over env and defaults.

    Raises ConfigError naming the first invalid setting, what was given and what is allowed.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # the rule across settings: an open server on a public host
            host = (err.get("input") or {}).get("host")
            raise ConfigError(
                "host without a tenants file",
                host,
                "a loopback address (127.0.0.1, ::1, localhost); "
                "or pass --tenants FILE, or --allow-open to expose an open server on purpose",
            ) from None
        name = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"server setting {name!r}", err.get("input"), message) from None
