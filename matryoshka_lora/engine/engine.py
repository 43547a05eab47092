"""The engine: owns the model, the KV cache and the adapters; one loop thread runs steps while there is work.

Other threads only call `add_request`, `abort`, `load_adapter`, `unload_adapter`, `stats` and
`shutdown`; each takes the engine lock briefly. The loop thread alone runs the model:

    while running:
        wait until there is work
        with lock: apply aborts; work = scheduler.schedule()
        logits = model_runner.run(model_runner.prepare(work))   # outside the lock
        tokens = sample(logits); detokenise; stop checks; emit events
        with lock: remove finished sequences (their KV slots and adapter references)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager

import torch

from matryoshka_lora.adapters.store import adapter_dirs
from matryoshka_lora.engine.adapter_slots import (
    AdapterSlots,
    SlotEntry,
    fuse_adapter,
    install_warmup_adapters,
    rounded_to_bf16,
)
from matryoshka_lora.engine.bf16_linear import min_wide_rows, split_packer
from matryoshka_lora.engine.budget.controller import BudgetController
from matryoshka_lora.engine.config import EngineConfig
from matryoshka_lora.engine.cpu_kernels import load_step_ops
from matryoshka_lora.engine.detokenizer import IncrementalDetokenizer, StopStringFilter
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.model_runner import BASE_SLOT, ModelRunner, StepItem
from matryoshka_lora.engine.sampler import sample
from matryoshka_lora.engine.scheduler import Scheduler
from matryoshka_lora.engine.sequence import Sequence
from matryoshka_lora.engine.weight_format import resolve_format
from matryoshka_lora.engine.weights import fuse_weights
from matryoshka_lora.errors import ConfigError, EngineStoppedError, check_count
from matryoshka_lora.types import EngineStats, GenerationRequest

log = logging.getLogger(__name__)


def eos_token_ids(hf_model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(hf_model, "generation_config", None), hf_model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return frozenset(ids)


class LLMEngine:
    def __init__(self, config: EngineConfig, hf_model=None, tokenizer=None):
        from matryoshka_lora.models import load_base_model, model_fingerprint, model_id

        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        loaded_from_config = hf_model is None
        if loaded_from_config:
            hf_model, tokenizer = load_base_model(config.model)
        self.tokenizer = tokenizer
        self.model_name = model_id(hf_model)
        ops = load_step_ops(config.fused_kernels, torch.float32)  # fuse_weights stores float32
        self.weight_format, blocks = resolve_format(config, ops, hf_model, loaded_from_config)
        self.weights = fuse_weights(
            hf_model,
            batch_size_hint=min(config.max_num_seqs, 64),
            pack_linear=(
                split_packer(ops.pack_linear, min_wide_rows(ops))
                if self.weight_format == "gguf+bf16"
                else ops.pack_linear
            ),
            blocks=blocks,
        )
        self.fingerprint = model_fingerprint(hf_model)
        self.eos_ids = eos_token_ids(hf_model, tokenizer)
        self.max_model_len = config.resolve_max_model_len(self.weights.spec.max_position_embeddings)
        kv_dtype = torch.bfloat16 if config.kv_cache_dtype == "bfloat16" else torch.float32
        self.kv = KVCache(self.weights.spec, config.max_num_seqs, self.max_model_len, kv_dtype)
        self.adapters = AdapterSlots(self.weights.spec, config.max_adapters)
        self.runner = ModelRunner(self.weights, self.kv, self.adapters.table, ops)
        if self.weight_format == "gguf+bf16":  # wide steps in bf16: the prefill chunks' attention too
            self.runner.prefill_dtype = torch.bfloat16
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_queue_len)
        self.budget = BudgetController(
            self.scheduler,
            self.adapters,
            self.max_model_len,
            config.budget_layers_off,
            max_one_call_rows=self.runner.max_one_call_rows,
        )
        self.lock = threading.Condition()
        self._seqs: dict[int, Sequence] = {}
        self._aborts: set[int] = set()
        self._slot_users: dict[int, int] = {}  # adapter slot -> sequences holding it
        self._retired: set[int] = set()  # adapter slots unloaded/replaced, freed when unused
        self._next_id = 0
        self._admitting = True
        self._stop = False
        self._loop_done: Future | None = None  # the loop, once started on its executor
        self.num_steps = 0
        # When the last step ended, while the loop runs steps back to back (None after it waited for work):
        # a step is observed from there, so the cost model learns what a request waits per step (the
        # scheduling, the events, the HTTP threads' turns), not only the forward.
        self._last_step_end: float | None = None
        for path in config.adapters:
            for directory in adapter_dirs(path):
                self.load_adapter(str(directory))

    # --- adapters -------------------------------------------------------------------------------
    def load_adapter(self, path: str, name: str | None = None) -> SlotEntry:
        """Load (or replace) an adapter; requests running on a replaced one finish on its old weights."""
        from matryoshka_lora.adapters.store import load_adapter

        adapter = load_adapter(path, base_fingerprint=self.fingerprint)
        name = name or adapter.manifest.name
        weights = adapter.weights
        if self.config.adapter_dtype == "bfloat16":
            weights = rounded_to_bf16(weights)
        # the heavy part, off the engine loop and without the lock: fused, then packed for the op set
        fused = fuse_adapter(self.weights.spec, weights, adapter.manifest.r_max, self.runner.ops.pack_lora)
        with self.lock:
            if name in self.adapters.entries:
                self._retire(self.adapters.unregister(name))
            return self.adapters.install(name, adapter.manifest, str(path), fused)

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests on it at once; its slot is freed when its last sequence finishes."""
        from matryoshka_lora.errors import UnknownAdapterError

        with self.lock:
            if name not in self.adapters.entries:
                raise UnknownAdapterError(name, self.adapters.names())
            self._retire(self.adapters.unregister(name))

    def _retire(self, entry: SlotEntry) -> None:
        self._retired.add(entry.slot)
        self._release_slots()

    def _release_slots(self) -> None:
        for slot in [s for s in self._retired if self._slot_users.get(s, 0) == 0]:
            self._retired.discard(slot)
            self.adapters.free_slot(slot)

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest, emit) -> int:
        """Validate, choose the rank, enqueue. Raises before enqueueing; returns the sequence key."""
        params = request.sampling
        n = len(request.prompt_token_ids)
        if n == 0 or n >= self.max_model_len:
            raise ConfigError(
                "prompt length", n, f"1..{self.max_model_len - 1} tokens (max_model_len {self.max_model_len})"
            )
        check_count("max_tokens", params.max_tokens)
        with self.lock:
            if not self._admitting:
                raise EngineStoppedError()
            choice = self.budget.choose(request)
            entry = choice.entry
            generator = None
            if params.temperature > 0:
                seed = params.seed if params.seed is not None else self.config.seed + self._next_id
                generator = torch.Generator().manual_seed(seed)
            seq = Sequence(
                request=request,
                emit=emit,
                adapter=entry.name if entry else None,
                adapter_slot=entry.slot if entry else BASE_SLOT,
                rank=choice.rank,
                scale=entry.scale(choice.rank) if entry else 0.0,
                rank_reason=choice.reason,
                detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids),
                stop_filter=StopStringFilter(params.stop),
                generator=generator,
                max_len=min(self.max_model_len, n + params.max_tokens),
                predicted_latency_s=choice.predicted_s,
                budget_margin=choice.margin,
            )
            self.scheduler.add(seq)  # may raise QueueFullError
            key, self._next_id = self._next_id, self._next_id + 1
            self._seqs[key] = seq
            seq.key = key
            if entry:
                self._slot_users[entry.slot] = self._slot_users.get(entry.slot, 0) + 1
            self.lock.notify()
        return key

    def abort(self, key: int) -> None:
        """Abort a request (its consumer went away); the loop frees its slot before the next step."""
        with self.lock:
            if key in self._seqs:
                self._aborts.add(key)
                self.lock.notify()

    def _finish(self, seq: Sequence) -> None:
        """Under the lock: drop the sequence, its KV slot and its adapter reference."""
        self.scheduler.remove(seq)
        self._seqs.pop(seq.key, None)
        if seq.adapter_slot != BASE_SLOT:
            self._slot_users[seq.adapter_slot] -= 1
            self._release_slots()

    def _apply_aborts(self) -> None:
        for key in self._aborts:
            seq = self._seqs.get(key)
            if seq is not None:
                seq.finish_reason = "abort"
                self._finish(seq)
                seq.emit(seq.finished_event())
        self._aborts.clear()

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> int:
        """Run one forward over the scheduled work; returns the number of tokens computed."""
        since = self._last_step_end
        with self.lock:
            self._apply_aborts()
            work = self.scheduler.schedule()
        if not work:
            self._last_step_end = None
            return 0
        items = [
            StepItem(
                s.token_ids[s.num_computed : s.num_computed + n],
                s.kv_slot,
                s.num_computed,
                s.num_computed + n == len(s.token_ids),
                s.adapter_slot,
                s.rank,
                s.scale,
            )
            for s, n in work
        ]
        started = time.perf_counter()
        batch = self.runner.prepare(items)
        idx, logits = self.runner.run(batch)
        for s, n in work:
            s.num_computed += n
        sampled = [work[i][0] for i in idx]
        tokens = sample(
            logits,
            [s.request.sampling for s in sampled],
            [s.generator for s in sampled],
            self.runner.ops.argmax_rows,
        )
        self.budget.observe_step(items, batch.lora_groups, time.perf_counter() - (since or started))
        self.num_steps += 1
        done = [s for s, t in zip(sampled, tokens) if self._append_token(s, t)]
        with self.lock:
            self.budget.observe_finished(done, time.perf_counter())
            for s in done:
                if s.key in self._seqs:
                    self._finish(s)
            self._apply_aborts()
        self._last_step_end = time.perf_counter()
        return sum(n for _, n in work)

    def _append_token(self, seq: Sequence, token: int) -> bool:
        """Record a sampled token and emit its event; True when the sequence finished."""
        seq.token_ids.append(token)
        if seq.first_token_t is None:
            seq.first_token_t = time.perf_counter()
        params = seq.request.sampling
        finish, text = None, ""
        if token in self.eos_ids and not getattr(params, "ignore_eos", False):
            finish = "stop"
            text = seq.stop_filter.flush()
        else:
            text, hit = seq.stop_filter.push(seq.detokenizer.step(token))
            if hit:
                finish = "stop"
            elif len(seq.token_ids) >= seq.max_len:
                finish = "length"
                text += seq.stop_filter.flush()
        if finish is None:
            seq.emit(seq.event(text, [token]))
            return False
        seq.finish_reason = finish
        seq.emit(seq.finished_event(text, [token]))
        return True

    # --- for the backend and the warm-up --------------------------------------------------------
    def adapter_entries(self) -> list[SlotEntry]:
        """The loaded adapters, by name."""
        with self.lock:
            return sorted(self.adapters.entries.values(), key=lambda e: e.name)

    def warmup(self, repeats: int = 3) -> None:
        """Time synthetic steps and fit the budget controller's cost model (budget.calibration)."""
        from matryoshka_lora.engine.budget.calibration import calibrate

        calibrate(self, self.budget.cost_model, repeats)

    @contextmanager
    def scratch(self) -> Iterator[tuple[list[int], list[SlotEntry]]]:
        """(free KV slots, adapter entries to time) for timing synthetic steps; all given back after."""
        with self.lock:
            entries, installed = install_warmup_adapters(self.adapters, self.weights.spec, self.runner.ops.pack_lora)
            slots = [self.kv.allocate() for _ in range(min(self.kv.num_free_slots, self.config.max_num_seqs))]
        try:
            yield slots, entries
        finally:
            with self.lock:
                for slot in slots:
                    self.kv.free(slot)
                for entry in installed:
                    self.adapters.unregister(entry.name)
                    self.adapters.free_slot(entry.slot)

    def time_step(self, items: list[StepItem]) -> tuple[list, float]:
        """(the step's LoRA groups, seconds) of one forward over `items`, timed as `step` times it."""
        started = time.perf_counter()
        batch = self.runner.prepare(items)
        self.runner.run(batch)
        return batch.lora_groups, time.perf_counter() - started

    # --- the loop -------------------------------------------------------------------------------
    def start_loop(self, executor: Executor) -> None:
        """Run the loop on `executor`: a single-worker pool that also built and warmed up this engine, so
        that one thread runs every torch op and the process keeps one OpenMP thread pool."""
        self._loop_done = executor.submit(self._loop)

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.scheduler.has_work() and not self._aborts:
                    self._last_step_end = None  # the next step starts from an idle loop
                    self.lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # never let one bad step kill the engine silently
                log.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _fail_all(self, error: str) -> None:
        with self.lock:
            for seq in list(self._seqs.values()):
                seq.finish_reason = "error"
                self._finish(seq)
                seq.emit(seq.finished_event(error=error))

    def shutdown(self, drain_timeout_s: float) -> None:
        """Stop admitting, let in-flight requests finish up to the timeout, abort the rest, stop the loop."""
        deadline = time.monotonic() + max(drain_timeout_s, 0.0)
        with self.lock:
            self._admitting = False
        while time.monotonic() < deadline:
            with self.lock:
                if not self.scheduler.has_work():
                    break
            time.sleep(0.01)
        with self.lock:
            self._aborts.update(self._seqs)
            self._apply_aborts()
            self._stop = True
            self.lock.notify_all()
        if self._loop_done is not None:
            self._loop_done.result()

    def stats(self) -> EngineStats:
        with self.lock:
            running = self.scheduler.running
            waiting = self.scheduler.waiting_seqs()
            return EngineStats(
                num_running=len(running),
                num_waiting=len(waiting),
                kv_cache_usage=self.kv.usage(),
                max_num_seqs=self.config.max_num_seqs,
                running_adapters=tuple(sorted({s.adapter for s in running if s.adapter})),
                waiting_adapters=tuple(sorted({s.adapter for s in waiting if s.adapter})),
                budget_latency_margin=self.budget.margin(),
            )
