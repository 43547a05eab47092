"""Input covariances of an adapter's modules on a task's data, for nesting by activations (adapters.nest).

    model = the base model with the adapter attached, served at r_max (the trained function)
    for each batch of the first `num_examples` examples of `split` (prompt + answer, teacher-forced):
        C[module] += sum over the real tokens (padding masked) of x x^T     x: the module's input row
    C[module] /= the number of real tokens

Modules that read the same input (q, k, v; gate, up) share one matrix.
"""

from __future__ import annotations

import logging

import torch

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.training import data, tasks

log = logging.getLogger(__name__)


@torch.no_grad()
def input_covariances(
    model,
    tokenizer,
    adapter: store.Adapter,
    task: str,
    split: str = "train",
    num_examples: int = 256,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """{module path: C (float64, [in, in])} for every module of `adapter`, on `model` (module docstring).

    Attaches the adapter to `model` (which it modifies)."""
    layers = store.attach_adapter(model, adapter)
    inject.set_inference_ranks(model, adapter.manifest.r_max)
    records = data.records_from_examples(tasks.task_examples(task, split, num_examples))
    totals: dict[str, torch.Tensor] = {}  # first reader's path -> sum of x^T x
    shared: dict[str, str] = {}  # module path -> the first module that read the same input
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this batch's inputs, held so that ids stay unique
    mask = torch.ones(0, dtype=torch.bool)  # this batch's real tokens, [batch, seq]

    def hook(path):
        def record(module, args):
            x = args[0]
            held = seen.get(id(x))
            if held is not None and held[0] is x:
                shared.setdefault(path, held[1])
                return
            seen[id(x)] = (x, path)
            shared.setdefault(path, path)
            rows = x[mask].double()
            totals[path] = totals[path] + rows.T @ rows if path in totals else rows.T @ rows

        return record

    num_tokens = 0
    handles = [layer.register_forward_pre_hook(hook(path)) for path, layer in layers.items()]
    try:
        for i in range(0, len(records), batch_size):
            batch = data.collate_records(tokenizer, records[i : i + batch_size], 1024)
            mask = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            seen.clear()
            num_tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    log.info(
        "input covariances of %d modules (%d distinct inputs) over %d tokens of %d %s/%s examples",
        len(layers),
        len(totals),
        num_tokens,
        len(records),
        task,
        split,
    )
    means = {path: total / num_tokens for path, total in totals.items()}
    return {path: means[shared[path]] for path in layers}
