"""Fixtures of the load-test tests: tiny adapters (written with the core's save_adapter) for the tiny
random Llama, and one `matryoshka-lora serve` subprocess shared by the smoke scenarios."""

from __future__ import annotations

from pathlib import Path

import pytest

SERVER_MAX_NUM_SEQS, SERVER_MAX_QUEUE_LEN = 4, 4


def save_tiny_adapter(model, out_dir: Path, name: str, r_max: int, train_ranks: tuple[int, ...], seed: int) -> Path:
    """Random A and non-zero B on q/v/o/down projections, so every rank serves a different model."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter

    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    return save_random_adapter(
        model, out_dir, name, r_max, target_modules=targets, seed=seed, std=0.3, train_ranks=train_ranks
    )


@pytest.fixture(scope="session")
def lt_adapters(tiny_model_dir, tmp_path_factory) -> Path:
    """A folder with alpha (r_max 8, ranks 1,2,4,8) and beta (r_max 4, ranks 1,2,4)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("lt-adapters")
    save_tiny_adapter(model, root / "alpha", "alpha", 8, (1, 2, 4, 8), seed=1)
    save_tiny_adapter(model, root / "beta", "beta", 4, (1, 2, 4), seed=2)
    return root


@pytest.fixture(scope="session")
def lt_server(tiny_model_dir, lt_adapters, tmp_path_factory):
    """`matryoshka-lora serve` on the tiny model, 4 sequences at once, a queue of 4 (so overload bites)."""
    from matryoshka_lora.loadtest.server import ServerProcess, serve_args

    args = serve_args(
        str(tiny_model_dir),
        [lt_adapters],
        num_threads=1,
        max_num_seqs=SERVER_MAX_NUM_SEQS,
        max_queue_len=SERVER_MAX_QUEUE_LEN,
    )
    with ServerProcess(args, tmp_path_factory.mktemp("lt-server") / "server.log", ready_timeout_s=300) as server:
        yield server
