"""Which sequences run this step, and how many of their tokens.

Per step, with a token budget of max_num_batched_tokens:
    1. every running sequence that is decoding gets its 1 token (decode is never starved);
    2. running sequences still prefilling continue their prompt, in admission order, within the budget;
    3. waiting requests are admitted while a KV slot is free and budget is left, taking tenants in
       round-robin order (one request per tenant per turn), so one tenant's flood cannot starve
       another tenant's requests; an admitted request starts its prefill in the same step.
The waiting queue is bounded (max_queue_len). The scheduler is not thread-safe: the engine holds its
lock around every call.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.sequence import SeqStatus, Sequence
from matryoshka_lora.errors import QueueFullError


class Scheduler:
    def __init__(
        self,
        kv: KVCache,
        max_num_batched_tokens: int,
        max_queue_len: int,
    ):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue_len = max_queue_len
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # tenant -> its queue, in turn order
        self.running: list[Sequence] = []
        self.num_waiting = 0

    def add(self, seq: Sequence) -> None:
        if self.num_waiting >= self.max_queue_len:
            raise QueueFullError(self.max_queue_len)
        self.waiting.setdefault(seq.tenant, deque()).append(seq)
        self.num_waiting += 1

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def waiting_seqs(self) -> list[Sequence]:
        return [s for q in self.waiting.values() for s in q]

    def _next_waiting(self) -> Sequence:
        """Pop the head of the tenant whose turn it is, then move that tenant to the back."""
        tenant, queue = next(iter(self.waiting.items()))
        seq = queue.popleft()
        del self.waiting[tenant]
        if queue:
            self.waiting[tenant] = queue
        self.num_waiting -= 1
        return seq

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The step's work: (sequence, number of its pending tokens to compute)."""
        budget = self.max_num_batched_tokens
        work: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if not seq.is_prefilling:
                work.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(seq.num_pending, budget)
                work.append((seq, n))
                budget -= n
        while budget > 0 and self.kv.num_free_slots > 0 and self.num_waiting > 0:
            seq = self._next_waiting()
            seq.kv_slot = self.kv.allocate()
            seq.status = SeqStatus.RUNNING
            seq.scheduled_t = time.perf_counter()
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            work.append((seq, n))
            budget -= n
        return work

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, freeing its KV slot at once."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.kv_slot)
            seq.kv_slot = None
        elif seq.status == SeqStatus.WAITING:
            queue = self.waiting.get(seq.tenant)
            if queue is not None and seq in queue:
                queue.remove(seq)
                self.num_waiting -= 1
                if not queue:
                    del self.waiting[seq.tenant]
        seq.status = SeqStatus.FINISHED
