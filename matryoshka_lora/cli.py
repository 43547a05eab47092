"""The `matryoshka-lora` command: one subcommand per job, each built from a typed signature.

Each subcommand only parses and validates its arguments, then calls into the package; heavy imports
happen inside the command so that `--help` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from matryoshka_lora.training.tasks import TASKS  # light: the task table, no torch

app = typer.Typer(
    help="Train and serve nested-rank (Matryoshka) LoRA adapters: one adapter, every rank.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", help="Local Hugging Face model directory; default: the embedded SmolLM2-135M-Instruct."),
]


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --- subcommands are added below, one block each -------------------------------------------------


# --- export / import / demo (issue 2) -------------------------------------------------------------


@app.command("export")
def export_(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter directory (manifest.json + adapter.safetensors).")],
    rank: Annotated[int, typer.Option("--rank", help="The rank R of the slice to export (1..r_max).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the PEFT adapter.")],
) -> None:
    """Export the rank-R slice of an adapter as a standard PEFT LoRA adapter (for PEFT, vLLM, ...).

    The first R columns of A and rows of B are written with PEFT key names; lora_alpha is set so that
    PEFT's lora_alpha / r equals the adapter's alpha * s_R, so the PEFT model reproduces rank R exactly.
    """
    from matryoshka_lora.adapters.peft_io import export_peft

    typer.echo(str(export_peft(adapter_dir, rank, out)))


@app.command("import")
def import_(
    peft_dir: Annotated[Path, typer.Argument(help="PEFT LoRA adapter directory (adapter_config.json + weights).")],
    out: Annotated[Path, typer.Option("--out", help="Output adapter directory in this project's format.")],
    model: ModelOpt = None,
    name: Annotated[
        Optional[str], typer.Option("--name", help="Adapter name; default: the PEFT directory's name.")
    ] = None,
) -> None:
    """Import a PEFT LoRA adapter by SVD: every rank-k slice becomes its best rank-k approximation.

    The base model (--model) must be the one the PEFT adapter was trained on; its fingerprint is stored
    in the manifest. DoRA, bias training, modules_to_save and rank/alpha patterns are refused.
    """
    from matryoshka_lora.adapters.peft_io import import_peft
    from matryoshka_lora.models import load_base_model

    base, _ = load_base_model(model)
    adapter = import_peft(peft_dir, out, base, name=name)
    typer.echo(f"{adapter.path} (r_max={adapter.manifest.r_max}, {len(adapter.weights)} modules)")


@app.command()
def nest(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter directory to nest (any method).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the nested adapter.")],
    source: Annotated[
        Optional[str],
        typer.Option(
            "--source",
            help="p: the training diagonal folded in (matryoshka's default) | r_max: the adapter as served at r_max (every other method's default).",
        ),
    ] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Adapter name; default: the source adapter's.")] = None,
    bf16: Annotated[
        bool,
        typer.Option(
            "--bf16", help="Store the nested weights in bfloat16 (half the size; loaders compute in float32)."
        ),
    ] = False,
    svd: Annotated[
        bool,
        typer.Option(
            "--svd/--fold-only",
            help="--fold-only: fold the diagonal into A and keep the trained column order (a diagnostic).",
        ),
    ] = True,
    activations: Annotated[
        Optional[str],
        typer.Option(
            "--activations",
            help="A task name: keep each rank's best approximation in the norm of the module inputs on that "
            "task's train split (loads the base model) instead of the plain SVD's.",
        ),
    ] = None,
    num_calib: Annotated[int, typer.Option("--num-calib", min=1, help="Train examples for --activations.")] = 256,
    damp: Annotated[
        float, typer.Option("--damp", min=0.0, help="--activations: ridge on the covariance, x its mean diagonal.")
    ] = 0.01,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Base model for --activations; default: the embedded one.")
    ] = None,
) -> None:
    """Re-factor each module's trained update by SVD so that every rank-k slice is its best rank-k approximation.

    The output is served with scaling none and alpha 1; rank r_max reproduces the trained function
    exactly, and lower ranks keep the largest singular directions first: of the update itself (no
    model loaded), or with --activations TASK of the update as the task's inputs see it.
    """
    import torch

    from matryoshka_lora.adapters.nest import nest_adapter
    from matryoshka_lora.adapters.store import load_adapter, save_adapter

    adapter = load_adapter(adapter_dir)
    covariances = None
    if activations is not None:
        from matryoshka_lora.models import load_base_model
        from matryoshka_lora.training.activations import input_covariances

        base, tokenizer = load_base_model(model)
        plain = nest_adapter(adapter, source=source)  # the trained function, served at r_max
        covariances = input_covariances(base, tokenizer, plain, activations, num_examples=num_calib)
    nested = nest_adapter(adapter, source=source, name=name, svd=svd, covariances=covariances, damp=damp)
    if bf16:
        nested.weights = {path: (a.to(torch.bfloat16), b.to(torch.bfloat16)) for path, (a, b) in nested.weights.items()}
    typer.echo(str(save_adapter(out, nested.manifest, nested.weights)))


def _rank_list(text: str) -> list[int]:
    from matryoshka_lora.errors import ConfigError

    try:
        ranks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError("--ranks", text, "comma-separated integers, e.g. 1,4,16") from None
    if not ranks or ranks[0] < 0:
        raise ConfigError("--ranks", text, "one or more ranks >= 0 (0 = the base model)")
    return ranks


@app.command()
def demo(
    model: ModelOpt = None,
    ranks: Annotated[
        str, typer.Option("--ranks", help="Comma-separated ranks to generate at (0 = base model).")
    ] = "1,4,16",
    prompt: Annotated[
        str, typer.Option("--prompt", help="The user message.")
    ] = "Give me three short tips for learning to cook.",
    adapter: Annotated[
        Optional[Path],
        typer.Option(
            "--adapter", help="Adapter directory; default: the first shipped one in adapters/ that fits the model."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate per rank.")] = 48,
) -> None:
    """Generate greedily from one prompt at several ranks of one Matryoshka adapter.

    Without a shipped adapter for the model, a fresh one (random A, zero B) is attached: it equals the
    base model at every rank, which the log says.
    """
    from matryoshka_lora.adapters import demo as demo_mod

    for rank, text in demo_mod.run_demo(model, _rank_list(ranks), prompt, adapter, max_new_tokens):
        typer.echo(f"[rank {rank}] {text}")


# --- end export / import / demo ------------------------------------------------------------------


# --- train / eval (issue 3) ----------------------------------------------------------------------


def _int_list(text: str | None, what: str) -> tuple[int, ...] | None:
    """Parse "1,2,4" into (1, 2, 4); None stays None."""
    from matryoshka_lora.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(what, text, "comma-separated integers, e.g. 1,2,4,8") from None


@app.command()
def train(
    out: Annotated[
        Path, typer.Option("--out", help="Output adapter directory (checkpoints go to <out>-checkpoints/).")
    ],
    task: Annotated[Optional[str], typer.Option("--task", help=f"Built-in task ({', '.join(TASKS)}).")] = None,
    data: Annotated[
        Optional[Path], typer.Option("--data", help='JSONL of {"prompt","completion"} or {"messages": [...]}.')
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="lora | dylora | matryoshka | matryoshka-binary (only the diagonal p differs; "
            "matryoshka-binary: the authors' mean form, p / number of train ranks).",
        ),
    ] = "matryoshka",
    rank: Annotated[int, typer.Option("--rank", help="r_max: the adapter's largest rank.")] = 32,
    train_ranks: Annotated[
        Optional[str],
        typer.Option("--train-ranks", help="Nested ranks S, e.g. 1,2,4,8; default: powers of two up to r_max."),
    ] = None,
    scaling: Annotated[
        str, typer.Option("--scaling", help="Per-rank scale s_r: none | rank (1/r) | sqrt (1/sqrt r).")
    ] = "none",
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (the update is alpha * s_r * x A B).")] = 1.0,
    targets: Annotated[
        Optional[str],
        typer.Option("--targets", help="Comma-separated module names; default: all attention and MLP projections."),
    ] = None,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    epochs: Annotated[float, typer.Option("--epochs")] = 1.0,
    max_steps: Annotated[
        Optional[int], typer.Option("--max-steps", help="Optimizer steps; overrides --epochs.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Per device.")] = 16,
    grad_accum: Annotated[int, typer.Option("--grad-accum")] = 1,
    max_seq_len: Annotated[
        int, typer.Option("--max-seq-len", help="Longer records are skipped (counted, logged).")
    ] = 64,
    num_train: Annotated[int, typer.Option("--num-train", help="Examples drawn from a built-in task.")] = 4000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    save_every: Annotated[
        Optional[int], typer.Option("--save-every", help="Checkpoint every N optimizer steps.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of --out.")] = False,
    name: Annotated[
        Optional[str], typer.Option("--name", help="Adapter name; default: the --out directory's name.")
    ] = None,
    slice_loss: Annotated[
        int,
        typer.Option(
            "--slice-loss", min=0, help="Also train K sampled lower ranks as served, each step (K+1 forward passes)."
        ),
    ] = 0,
    nest: Annotated[
        bool,
        typer.Option(
            "--nest/--no-nest",
            help="Write the adapter nested by SVD (training diagonal folded in) to --out, the raw one to <out>-raw; --no-nest: the raw one to --out.",
        ),
    ] = True,
    rank_loss_every: Annotated[
        Optional[int],
        typer.Option(
            "--rank-loss-every",
            help="Log the dev loss at every train rank every N steps (<out>-checkpoints/rank_losses.jsonl).",
        ),
    ] = None,
    bf16: Annotated[
        Optional[bool],
        typer.Option(
            "--bf16/--no-bf16",
            help="bf16 autocast; default: on where supported (CUDA, or a CPU with AVX512-BF16).",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
) -> None:
    """Train a LoRA / DyLoRA / Matryoshka adapter (Hugging Face Trainer; works under torchrun / accelerate launch)."""
    from matryoshka_lora.adapters.inject import DEFAULT_TARGET_MODULES
    from matryoshka_lora.training.trainer import TrainConfig
    from matryoshka_lora.training.trainer import train as run_training

    cfg = TrainConfig(
        out=out,
        method=method,
        r_max=rank,
        train_ranks=_int_list(train_ranks, "--train-ranks"),
        scaling=scaling,
        alpha=alpha,
        target_modules=tuple(t.strip() for t in targets.split(",")) if targets else DEFAULT_TARGET_MODULES,
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_seq_len=max_seq_len,
        num_train=num_train,
        seed=seed,
        save_every=save_every,
        resume=resume,
        task=task,
        data=data,
        model=model,
        name=name,
        slice_loss=slice_loss,
        nest=nest,
        rank_loss_every=rank_loss_every,
        bf16=bf16,
    )
    run_training(cfg.validate())


@app.command("eval")
def eval_(
    adapters: Annotated[list[Path], typer.Argument(help="One or more adapter directories.")],
    task: Annotated[str, typer.Option("--task", help="Built-in task to evaluate on.")],
    ranks: Annotated[
        Optional[str], typer.Option("--ranks", help="e.g. 1,2,4,8,16,32; default: each adapter's train ranks.")
    ] = None,
    num_test: Annotated[int, typer.Option("--num-test", help="Test examples (a fixed, seeded split).")] = 200,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="test | dev (for picking hyper-parameters; dev results are not stored in manifests)."
        ),
    ] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", help="The hf backend's generate batch.")] = 50,
    max_num_seqs: Annotated[
        int,
        typer.Option(
            "--max-num-seqs",
            help="The engine backend's sequences at once; 1 decodes every step as one user's (one-row kernels).",
        ),
    ] = 64,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Default: the task's.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the result JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the rank-accuracy curves to this PNG.")] = None,
    no_manifest: Annotated[
        bool, typer.Option("--no-manifest", help="Do not store the accuracies in the manifests.")
    ] = False,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="engine: the serving engine, every rank in one batch | hf: transformers generate, one rank at a time.",
        ),
    ] = "engine",
    weight_format: Annotated[
        str,
        typer.Option(
            "--weight-format",
            help="The engine backend's base weights: auto (what `serve` takes on this CPU) | gguf | gguf+bf16 | "
            "float32 (see `serve --help`).",
        ),
    ] = "auto",
    model: ModelOpt = None,
) -> None:
    """Accuracy of each adapter at every rank (greedy, exact match), AURAC (log2, linear) and the base model's accuracy."""
    from matryoshka_lora.training.evaluate import EvalConfig, evaluate, format_table, write_result
    from matryoshka_lora.training.plots import plot_rank_curves

    cfg = EvalConfig(
        adapters=tuple(adapters),
        task=task,
        ranks=_int_list(ranks, "--ranks"),
        num_test=num_test,
        split=split,
        batch_size=batch_size,
        max_num_seqs=max_num_seqs,
        max_new_tokens=max_new_tokens,
        model=model,
        update_manifests=not no_manifest,
        backend=backend,
        weight_format=weight_format,
    )
    result = evaluate(cfg)
    typer.echo(format_table(result))
    if out is not None:
        write_result(result, out)
    if plot is not None:
        plot_rank_curves(result, plot)


@app.command()
def plot(
    results: Annotated[
        list[str],
        typer.Argument(help="`eval --out` JSON files: PATH, PATH#I (its I-th adapter), either with =LABEL."),
    ],
    out: Annotated[Path, typer.Option("--out", help="The PNG to write.")],
    title: Annotated[Optional[str], typer.Option("--title", help="Default: the task and test size.")] = None,
) -> None:
    """Draw accuracy per rank of adapters from one or more eval results on one PNG (log2 rank axis)."""
    from matryoshka_lora.training.plots import merge_results, plot_rank_curves

    typer.echo(str(plot_rank_curves(merge_results(results), out, title)))


@app.command("fit-scales")
def fit_scales(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter directory; its manifest gets the fitted rank_scales.")],
    task: Annotated[str, typer.Option("--task", help="Task whose dev split the scales are fitted on.")],
    ranks: Annotated[
        Optional[str], typer.Option("--ranks", help="e.g. 1,2,4; default: the adapter's train ranks.")
    ] = None,
    candidates: Annotated[
        Optional[str], typer.Option("--candidates", help="Comma-separated scales to try (must include 1).")
    ] = None,
    num_dev: Annotated[int, typer.Option("--num-dev", help="Dev examples the loss is measured on.")] = 200,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the fit, do not write the manifest.")] = False,
    model: ModelOpt = None,
) -> None:
    """Fit a per-rank serving scale c_r (rank r served at alpha * s_r * c_r) by dev loss; every backend serves it."""
    import json

    from matryoshka_lora.training import rank_scales as rs

    cfg = rs.FitConfig(
        adapter=adapter_dir,
        task=task,
        ranks=_int_list(ranks, "--ranks"),
        num_dev=num_dev,
        model=model,
        candidates=_float_list(candidates, "--candidates") or rs.CANDIDATES,
    )
    fitted, losses = rs.fit_rank_scales(cfg)
    typer.echo(json.dumps({"rank_scales": fitted, "dev_loss": losses}, indent=2))
    if not dry_run:
        rs.write_rank_scales(adapter_dir, fitted)


# --- end train / eval ----------------------------------------------------------------------------


# --- serve (issue 4) ------------------------------------------------------------------------------


def _hash_key_from_stdin() -> None:
    import sys

    from matryoshka_lora.server.tenants import hash_key

    key = typer.prompt("API key", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not key:
        raise typer.BadParameter("empty API key", param_hint="stdin")
    typer.echo(hash_key(key))


@app.command()
def serve(
    host: Annotated[
        Optional[str],
        typer.Option(
            "--host",
            help="Address to bind [MATRYOSHKA_HOST; 127.0.0.1]. "
            "A non-loopback address needs --tenants (or --allow-open).",
        ),
    ] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port [MATRYOSHKA_PORT; 8000].")] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="Local Hugging Face model directory [MATRYOSHKA_MODEL; default: the embedded SmolLM2-135M-Instruct].",
        ),
    ] = None,
    adapters: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--adapters",
            help="Adapter directory, or a directory of "
            "adapter directories; repeatable [MATRYOSHKA_ADAPTERS, comma-separated; default ./adapters "
            "if it exists].",
        ),
    ] = None,
    tenants: Annotated[
        Optional[Path],
        typer.Option(
            "--tenants",
            help="Tenants file, TOML or YAML: API key hashes, "
            "allowed adapters, max_rank, rate limits, admin [MATRYOSHKA_TENANTS; none = open server, "
            "loopback only]. See deploy/tenants.example.toml.",
        ),
    ] = None,
    allow_open: Annotated[
        bool,
        typer.Option(
            "--allow-open",
            help="Serve without a tenants file on a non-loopback host (no API keys!) [MATRYOSHKA_ALLOW_OPEN].",
        ),
    ] = False,
    backend: Annotated[
        Optional[str],
        typer.Option(
            "--backend",
            help="native (CPU engine) | vllm (GPU) | auto (vllm "
            "when importable with CUDA, else native) [MATRYOSHKA_BACKEND; native].",
        ),
    ] = None,
    max_num_seqs: Annotated[
        Optional[int], typer.Option("--max-num-seqs", help="Requests running at once [MATRYOSHKA_MAX_NUM_SEQS; 32].")
    ] = None,
    max_queue_len: Annotated[
        Optional[int],
        typer.Option(
            "--max-queue-len", help="Requests waiting before the server answers 503 [MATRYOSHKA_MAX_QUEUE_LEN; 256]."
        ),
    ] = None,
    max_model_len: Annotated[
        Optional[int],
        typer.Option(
            "--max-model-len", help="Prompt + output tokens per request [MATRYOSHKA_MAX_MODEL_LEN; engine default]."
        ),
    ] = None,
    max_prompt_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-prompt-tokens", help="Longest prompt in tokens; longer: 413 [MATRYOSHKA_MAX_PROMPT_TOKENS; 2048]."
        ),
    ] = None,
    max_output_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-output-tokens",
            help="Largest max_tokens of a request; larger: 422 [MATRYOSHKA_MAX_OUTPUT_TOKENS; 1024].",
        ),
    ] = None,
    max_body_bytes: Annotated[
        Optional[int],
        typer.Option(
            "--max-body-bytes", help="Largest request body; larger: 413 [MATRYOSHKA_MAX_BODY_BYTES; 1048576]."
        ),
    ] = None,
    drain_timeout: Annotated[
        Optional[float],
        typer.Option(
            "--drain-timeout",
            help="Seconds requests in flight may take to finish after SIGTERM [MATRYOSHKA_DRAIN_TIMEOUT_S; 30].",
        ),
    ] = None,
    num_threads: Annotated[
        Optional[int],
        typer.Option("--num-threads", help="Torch threads of the engine [MATRYOSHKA_NUM_THREADS; torch default]."),
    ] = None,
    fused_kernels: Annotated[
        Optional[bool],
        typer.Option(
            "--fused-kernels/--no-fused-kernels",
            help="Native engine: "
            "the linears, decode LoRA groups, RMSNorm, RoPE + KV write and decode attention as C kernels compiled once "
            "with the system C compiler (torch ops without one) [MATRYOSHKA_FUSED_KERNELS; on].",
        ),
    ] = None,
    weight_format: Annotated[
        Optional[str],
        typer.Option(
            "--weight-format",
            help="Native engine: auto | gguf | gguf+bf16 | "
            "float32: the base linears on the GGUF file's own 4/8-bit blocks (~5.6x fewer bytes per "
            "step; steps of up to 16 rows on int8 activations where the CPU has AVX512-VNNI, as llama.cpp, "
            "~0.5 % error per linear), on the blocks for decode and a bfloat16 copy on the CPU's AMX tiles "
            "for prefill and many sequences (~0.3 % error per linear), or on float32 panels; auto = "
            "gguf+bf16 where the CPU has AMX, else gguf, where the model has a GGUF file "
            "[MATRYOSHKA_WEIGHT_FORMAT; auto].",
        ),
    ] = None,
    adapter_dtype: Annotated[
        Optional[str],
        typer.Option(
            "--adapter-dtype",
            help="Native engine: auto | bfloat16: the adapters' weights as saved (bfloat16 for an adapter "
            "saved in bfloat16, else float32), or rounded to bfloat16 at load (half the bytes a step reads of a "
            "float32 adapter) [MATRYOSHKA_ADAPTER_DTYPE; auto].",
        ),
    ] = None,
    kv_cache_dtype: Annotated[
        Optional[str],
        typer.Option(
            "--kv-cache-dtype",
            help="Native engine: auto (float32) | float32 | bfloat16: the KV cache's element type; bfloat16 halves "
            "its memory and the bytes a decode step reads per token of context [MATRYOSHKA_KV_CACHE_DTYPE; auto].",
        ),
    ] = None,
    budget_unmet: Annotated[
        Optional[str],
        typer.Option(
            "--budget-unmet",
            help="A request whose latency_budget_ms no "
            "rank is predicted to meet: serve (at the lowest rank, rank_reason budget_unmet) | refuse "
            "(503 budget_unmet + Retry-After, so the admitted requests keep their budgets; only "
            "when even the typical case would be late, else served at the lowest rank) "
            "[MATRYOSHKA_BUDGET_UNMET; serve].",
        ),
    ] = None,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help="Seed of requests without one [MATRYOSHKA_SEED; 0].")
    ] = None,
    log_level: Annotated[
        Optional[str],
        typer.Option(
            "--log-level",
            help="debug | info | warning | error; debug "
            "also logs each latency-budget decision's prediction terms and each budgeted request's "
            "real latency [MATRYOSHKA_LOG_LEVEL; info].",
        ),
    ] = None,
    access_log: Annotated[
        Optional[bool],
        typer.Option(
            "--access-log/--no-access-log",
            help="One log line per HTTP "
            "request, at info (off: ~0.1-0.2 ms less CPU per request) [MATRYOSHKA_ACCESS_LOG; on].",
        ),
    ] = None,
    hash_key: Annotated[
        bool,
        typer.Option(
            "--hash-key",
            help="Read an API key from stdin, print its sha256 for the tenants file, and exit (serves nothing).",
        ),
    ] = False,
) -> None:
    """Serve adapters over HTTP: /generate, OpenAI-compatible /v1/*, admin, /health, /ready, /metrics.

    Flags override MATRYOSHKA_* environment variables. SIGTERM drains requests in flight before exiting.
    """
    if hash_key:
        _hash_key_from_stdin()
        return
    from matryoshka_lora.server.run import run_server
    from matryoshka_lora.server.settings import load_settings

    settings = load_settings(
        host=host,
        port=port,
        model=model,
        adapters=adapters or None,
        tenants=tenants,
        allow_open=allow_open or None,
        backend=backend,
        max_num_seqs=max_num_seqs,
        max_queue_len=max_queue_len,
        max_model_len=max_model_len,
        max_prompt_tokens=max_prompt_tokens,
        max_output_tokens=max_output_tokens,
        max_body_bytes=max_body_bytes,
        drain_timeout_s=drain_timeout,
        num_threads=num_threads,
        fused_kernels=fused_kernels,
        weight_format=weight_format,
        adapter_dtype=adapter_dtype,
        kv_cache_dtype=kv_cache_dtype,
        budget_unmet=budget_unmet,
        seed=seed,
        log_level=log_level,
        access_log=access_log,
    )
    run_server(settings)


# --- end serve -----------------------------------------------------------------------------------


# --- loadtest (issue 7) ---------------------------------------------------------------------------


def _float_list(text: str | None, what: str) -> tuple[float, ...] | None:
    from matryoshka_lora.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(what, text, "comma-separated numbers, e.g. 0.5,1,2") from None


@app.command()
def loadtest(
    scenario: Annotated[str, typer.Argument(help="rank-sweep | mixed | budget | tenants | overload | soak | peers")],
    url: Annotated[
        Optional[str],
        typer.Option(
            "--url", help="A running server; default: start `serve` on a free 127.0.0.1 port (stopped at the end)."
        ),
    ] = None,
    model: ModelOpt = None,
    adapters: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--adapters",
            help="Adapter directory (or a directory of "
            "them) for the server it starts; repeatable. Default: random adapters at --r-max.",
        ),
    ] = None,
    duration: Annotated[
        Optional[float],
        typer.Option(
            "--duration",
            help="Seconds per phase (a rank x users cell, "
            "a rate step, ...); default per scenario: see loadtests/README.md.",
        ),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output directory; default loadtest-results/SCENARIO-TIME.")
    ] = None,
    users: Annotated[
        str, typer.Option("--users", help="Concurrent users (rank-sweep; the largest: mixed, peers).")
    ] = "1,4,16",
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="Ranks to sweep; default 1,8,32,r_max.")] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Tokens of the fixed prompt.")] = 128,
    output_tokens: Annotated[
        int, typer.Option("--output-tokens", help="Tokens generated per request (EOS ignored).")
    ] = 64,
    max_requests: Annotated[int, typer.Option("--max-requests", help="Most requests per phase.")] = 20_000,
    num_threads: Annotated[
        Optional[int],
        typer.Option("--num-threads", help="Torch threads of the server it starts and of the in-process peers."),
    ] = None,
    max_queue_len: Annotated[
        int,
        typer.Option(
            "--max-queue-len",
            help="overload: the server's queue bound (passed "
            "to the server it starts; give the server's own value with --url).",
        ),
    ] = 32,
    r_max: Annotated[int, typer.Option("--r-max", help="r_max of the random adapters made without --adapters.")] = 64,
    budget_ms: Annotated[
        Optional[float],
        typer.Option("--budget-ms", help="budget: the latency budget; default 3 x the unloaded latency at r_max."),
    ] = None,
    rates: Annotated[
        Optional[str],
        typer.Option("--rates", help="budget: offered rates in requests/s; default 0.25..1.5 x the rank-1 capacity."),
    ] = None,
    budget_unmet: Annotated[
        str,
        typer.Option(
            "--budget-unmet",
            help="budget: serve | refuse, the --budget-unmet "
            "of the server it starts (refuse: a budget no rank is predicted to meet gets 503).",
        ),
    ] = "serve",
    peers: Annotated[bool, typer.Option("--peers", help="rank-sweep: then run the peers scenario.")] = False,
    vllm_python: Annotated[
        Optional[Path],
        typer.Option(
            "--vllm-python",
            help="Python of a venv with vLLM "
            "(e.g. .venv-vllm/bin/python) for the vLLM peers: its offline engine, and `vllm serve` "
            "over HTTP.",
        ),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="MATRYOSHKA_API_KEY",
            help="Bearer key for a --url server with tenants [MATRYOSHKA_API_KEY].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Load-test the server (Locust + an open-loop generator): latency per rank, the budget-to-rank
    controller, tenants, overload, soak, peers. Writes OUT/report.md, OUT/result.json and PNG plots;
    exits 1 if an invariant failed (lost or miscounted requests, 5xx, unbounded queue)."""
    from matryoshka_lora.loadtest.config import LoadTestConfig, Workload
    from matryoshka_lora.loadtest.runner import run

    config = LoadTestConfig(
        scenario=scenario,
        out=out,
        url=url,
        model=model,
        adapters=adapters or [],
        duration_s=duration,
        max_requests=max_requests,
        workload=Workload(prompt_tokens=prompt_tokens, output_tokens=output_tokens),
        ranks=_int_list(ranks, "--ranks"),
        users=_int_list(users, "--users") or (),
        num_threads=num_threads,
        max_queue_len=max_queue_len,
        r_max=r_max,
        budget_ms=budget_ms,
        rates=_float_list(rates, "--rates"),
        budget_unmet=budget_unmet,
        peers=peers,
        vllm_python=vllm_python,
        api_key=api_key,
        seed=seed,
    )
    result, report_path = run(config)
    typer.echo(str(report_path))
    if not result.passed:
        raise typer.Exit(1)


# --- end loadtest --------------------------------------------------------------------------------


def main() -> None:
    from matryoshka_lora.errors import MatryoshkaError

    try:
        app()
    except MatryoshkaError as exc:  # user-facing errors: one clear line, no traceback
        logging.getLogger("matryoshka_lora").error("%s", exc)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
