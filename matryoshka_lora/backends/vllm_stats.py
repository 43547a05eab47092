"""Engine gauges from vLLM: a stat logger that keeps the latest scheduler stats for `stats()`.

vLLM's AsyncLLM calls every stat logger with each step's `SchedulerStats` (num_running_reqs,
num_waiting_reqs, kv_cache_usage, running/waiting LoRA adapters by name). `make_stat_logger_factory`
builds the factory AsyncLLM expects, `(vllm_config, engine_index) -> StatLoggerBase`, writing into a
`LatestSchedulerStats` that the backend reads; the class is built on first use so that importing this
module does not import vLLM.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from matryoshka_lora.backends.vllm_loras import parse_lora_name
from matryoshka_lora.errors import ConfigError


@dataclass
class LatestSchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    running_loras: tuple[str, ...] = ()  # vLLM LoRA names, "ADAPTER@RANK"
    waiting_loras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def update(self, scheduler_stats) -> None:
        with self.lock:
            self.num_running = int(getattr(scheduler_stats, "num_running_reqs", 0))
            self.num_waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
            self.kv_cache_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0))
            self.running_loras = tuple(k for k, n in getattr(scheduler_stats, "running_lora_adapters", {}).items() if n)
            self.waiting_loras = tuple(k for k, n in getattr(scheduler_stats, "waiting_lora_adapters", {}).items() if n)


def adapter_names(lora_names: tuple[str, ...]) -> tuple[str, ...]:
    """("add3@8", "add3@2", "sort5@4") -> ("add3", "sort5")."""
    names = set()
    for name in lora_names:
        try:
            names.add(parse_lora_name(name)[0])
        except ConfigError:
            names.add(name)
    return tuple(sorted(names))


def make_stat_logger_factory(latest: LatestSchedulerStats):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsKeeper(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, *args, **kwargs) -> None:
            if scheduler_stats is not None:
                latest.update(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerStatsKeeper
