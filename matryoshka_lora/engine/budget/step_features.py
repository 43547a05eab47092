"""What a forward step costs, as the cost model sees it: its features, for a step that ran and for the
prefill steps a prediction plans.

    num_tokens  = tokens computed (decode rows + prompt chunk tokens)
    lora_flops  = sum over the step's LoRA groups and their rows of row_cost_rank(row rank, group rank)
    lora_reads  = sum over the groups of the group rank              (weights read, once per group)
    num_groups  = LoRA groups (lora_batch.build_groups): dispatches of the op
    attn_work   = sum over the step's items of (item tokens * (item position + item tokens))
                  (each prompt chunk attends to its own sequence only)
    num_sampled = rows that sample a token (decode rows and prompts whose last chunk it is)
    per_call    = 1 where the step runs llama.forward, one Python call per op (a prompt chunk, or more
                  decode rows than the one-call path takes: model_runner.max_one_call_rows), else 0
    per_call_groups = per_call * num_groups (a LoRA group costs its Python calls only on that path)
    one_call_rows   = (1 - per_call) * num_tokens: the one-call path's decode rows run on the int8 blocks,
                  each row its own dot products (~0.5 ms a row here), where a per-call step's tokens
                  beyond 12 run on bf16 at a fraction of that (one num_tokens slope cannot fit both)

`plan_prefill` replays the scheduler's chunking (scheduler.schedule): each step, the decode rows take
one token each and the pending prompts, in order, fill the rest of `max_num_batched_tokens`; a prompt
whose last chunk is in a step samples its first token there and is a decode row from the next step on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ROW_RANK = 16  # a row of a masked group computes at least one 16-wide block and rank chunk (cpu_gemm.c)


def row_cost_rank(rank: int, group_rank: int) -> int:
    """The rank a row of a group at `group_rank` computes at: its own, at least one block, at most the group's."""
    return min(group_rank, max(rank, MIN_ROW_RANK))


FEATURES = (
    "const",
    "num_tokens",
    "lora_flops",
    "lora_reads",
    "num_groups",
    "attn_work",
    "num_sampled",
    "per_call",
    "per_call_groups",
    "one_call_rows",
)


@dataclass(frozen=True)
class StepFeatures:
    num_tokens: int
    lora_flops: int
    lora_reads: int
    num_groups: int
    attn_work: int
    num_sampled: int
    per_call: int = 1

    def vector(self) -> np.ndarray:
        return np.array(
            [
                1.0,
                self.num_tokens,
                self.lora_flops,
                self.lora_reads,
                self.num_groups,
                self.attn_work,
                self.num_sampled,
                self.per_call,
                self.per_call * self.num_groups,
                (1 - self.per_call) * self.num_tokens,
            ]
        )


def step_features(items, lora_groups, max_one_call_rows: int = 0) -> StepFeatures:
    """The features of a step as it runs (model_runner.StepItem's, its LoRA groups as the runner formed them);
    max_one_call_rows: the most decode rows the runner runs as one C call (0: none)."""
    one_call = len(items) <= max_one_call_rows and all(len(it.token_ids) == 1 for it in items)
    return StepFeatures(
        num_tokens=sum(len(it.token_ids) for it in items),
        lora_flops=sum(
            (g.end - g.start) * g.rank
            if g.row_ranks is None
            else sum(row_cost_rank(r, g.rank) for r in g.row_ranks.tolist())
            for g in lora_groups
        ),
        lora_reads=sum(g.rank for g in lora_groups),
        num_groups=len(lora_groups),
        attn_work=sum(len(it.token_ids) * (it.position + len(it.token_ids)) for it in items),
        num_sampled=sum(1 for it in items if it.sample),
        per_call=0 if one_call else 1,
    )


@dataclass(frozen=True)
class PendingPrompt:
    """A prompt not fully computed yet, in the order the scheduler will prefill it."""

    num_left: int  # its tokens still to compute
    num_done: int = 0  # its tokens already computed (earlier chunks)
    rank: int = 0  # the LoRA rank its chunks run at (0: the base model); each chunk is a group of its own


def plan_prefill(
    prompts: tuple[PendingPrompt, ...],
    num_decode_rows: int,
    decode_lora: tuple[int, int, int],
    decode_attn_work: int,
    max_num_batched_tokens: int,
) -> list[StepFeatures]:
    """The features of the steps that prefill `prompts` beside `num_decode_rows` decode rows (their LoRA
    (flops, reads, groups) `decode_lora`, their attention `decode_attn_work`), until the last prompt's
    last chunk; a finished prompt's row joins the decode rows (at no LoRA cost: a rough bound)."""
    prompts = tuple(p for p in prompts if p.num_left > 0)
    steps: list[StepFeatures] = []
    left = [p.num_left for p in prompts]
    done = [p.num_done for p in prompts]
    rows, first = num_decode_rows, 0  # `first`: the first prompt not finished
    while first < len(prompts):
        budget = max(max_num_batched_tokens - rows, 1)
        num_tokens, (flops, reads, groups), attn, sampled, finished = rows, decode_lora, decode_attn_work, rows, 0
        for i in range(first, len(prompts)):  # unfinished: left[i] > 0
            if budget <= 0:
                break
            chunk, rank = min(left[i], budget), prompts[i].rank
            num_tokens, attn = num_tokens + chunk, attn + chunk * (done[i] + chunk)
            if rank > 0:
                flops, reads, groups = flops + chunk * rank, reads + rank, groups + 1
            left[i], done[i], budget = left[i] - chunk, done[i] + chunk, budget - chunk
            if left[i] == 0:
                sampled, finished = sampled + 1, finished + 1
        steps.append(StepFeatures(num_tokens, flops, reads, groups, attn, sampled))
        first, rows = first + finished, rows + finished
    return steps
