"""The engine interface the HTTP layer talks to (the data that crosses it: matryoshka_lora.types).

The server only enqueues a `GenerationRequest` and awaits `GenerationEvent`s; it never touches tensors.
Two backends implement `EngineBackend`: the native engine (`matryoshka_lora.engine`, the CPU default)
and vLLM (`matryoshka_lora.backends.vllm_backend`, for GPU nodes).
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from matryoshka_lora.types import AdapterInfo, EngineStats, GenerationEvent, GenerationRequest


class EngineBackend(Protocol):
    """What the HTTP layer needs from an engine. All methods are called from the server's event loop."""

    model_name: str

    async def start(self) -> None:
        """Load the model and adapters, warm up (and calibrate the cost model). `ready` is True after."""

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Stop admitting, let in-flight requests finish (up to the timeout), then stop the loop."""

    @property
    def ready(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Enqueue the request and yield its events. Closing the iterator early aborts the request
        and frees its slot at once. Raises UnknownAdapterError / InvalidRankError before enqueueing."""

    def list_adapters(self) -> list[AdapterInfo]: ...

    async def load_adapter(self, path: str, name: str | None = None) -> AdapterInfo:
        """Load (or replace) an adapter from a directory while serving."""

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter; requests already running on it finish first."""

    def stats(self) -> EngineStats: ...

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Tokenise a raw prompt, or render chat messages with the model's chat template."""
