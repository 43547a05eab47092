"""The native engine (matryoshka_lora.engine) behind the EngineBackend protocol.

The engine's loop thread produces events; each request's events reach its awaiting handler through
`loop.call_soon_threadsafe` into an asyncio queue. `generate` validates and enqueues synchronously (so
unknown adapters, bad ranks and a full queue raise at the call), then returns a `RequestStream`;
closing the stream (or dropping it) before the last event aborts the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matryoshka_lora.engine.config import EngineConfig
from matryoshka_lora.errors import ConfigError, EngineStoppedError
from matryoshka_lora.types import AdapterInfo, EngineStats, GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)


class RequestStream:
    """Async iterator over one request's events; `aclose()` (or garbage collection) aborts it if unfinished."""

    def __init__(self, engine, request_id: str, loop: asyncio.AbstractEventLoop):
        self._engine, self.request_id = engine, request_id
        self._queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self._done = False
        self.key: int | None = None
        queue = self._queue  # the callback must not hold the stream, so that dropping it aborts

        def emit(event: GenerationEvent) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        self.emit = emit

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.finished:
            self._done = True
        return event

    async def aclose(self) -> None:
        self._abort()

    def _abort(self) -> None:
        if not self._done:
            self._done = True
            if self.key is not None:
                self._engine.abort(self.key)

    def __del__(self) -> None:
        self._abort()


class NativeBackend:
    """EngineBackend on the native engine; `config.warmup` calibrates the cost model at start."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine = None
        self.model_name = Path(config.model).name if config.model else "SmolLM2-135M-Instruct"
        self._ready = False
        # One thread builds the engine, warms it up and then runs its loop, so that every torch op of the
        # model runs on it and the process holds one OpenMP thread pool (each thread that runs a parallel
        # op gets a pool of its own). Built and warmed up on other threads, the engine left the 2-core
        # machine ~30 % idle during a burst of 16 requests over HTTP (docs/performance.md).
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matryoshka-engine")

    async def start(self) -> None:
        from matryoshka_lora.engine.engine import LLMEngine

        loop = asyncio.get_running_loop()
        self.engine = await loop.run_in_executor(self._model_thread, LLMEngine, self.config)
        self.model_name = self.engine.model_name
        if self.config.warmup:
            await loop.run_in_executor(self._model_thread, self.engine.warmup)
        self.engine.start_loop(self._model_thread)
        self._ready = True
        log.info(
            "native engine ready: %s, adapters %s", self.model_name, [e.name for e in self.engine.adapter_entries()]
        )

    async def shutdown(self, drain_timeout_s: float) -> None:
        self._ready = False
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, drain_timeout_s)
        self._model_thread.shutdown(wait=False)

    @property
    def ready(self) -> bool:
        return self._ready

    def _engine(self):
        if self.engine is None:
            raise EngineStoppedError("not started")
        return self.engine

    def generate(self, request: GenerationRequest) -> RequestStream:
        engine = self._engine()
        stream = RequestStream(engine, request.request_id, asyncio.get_running_loop())
        stream.key = engine.add_request(request, stream.emit)
        return stream

    def list_adapters(self) -> list[AdapterInfo]:
        if self.engine is None:
            return []
        return [adapter_info(e) for e in self.engine.adapter_entries()]

    async def load_adapter(self, path: str, name: str | None = None) -> AdapterInfo:
        """Off the engine loop, on a thread of its own that ends with the load: the OpenMP pool its torch
        ops start ends with it, rather than idling beside the engine's (see `_model_thread`)."""
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matryoshka-adapter-load")
        try:
            entry = await asyncio.get_running_loop().run_in_executor(
                loader, self._engine().load_adapter, str(path), name
            )
        finally:
            loader.shutdown(wait=False)
        return adapter_info(entry)

    async def unload_adapter(self, name: str) -> None:
        self._engine().unload_adapter(name)

    def stats(self) -> EngineStats:
        if self.engine is None:
            return EngineStats(0, 0, 0.0, self.config.max_num_seqs)
        return self.engine.stats()

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        tokenizer = self._engine().tokenizer
        if (prompt is None) == (messages is None):
            raise ConfigError("prompt / messages", (prompt, messages), "exactly one of them")
        if prompt is not None:
            return list(tokenizer(prompt)["input_ids"])
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)


def adapter_info(entry) -> AdapterInfo:
    return AdapterInfo.of(entry.name, entry.manifest, entry.path, entry.r_max, entry.train_ranks)
