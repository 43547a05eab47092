"""peers: this server against transformers and vLLM on the same prompts, side by side, as ratios.

ours     the `mixed` scenario's mix (every adapter x ranks 1, 8, 32, r_max) over HTTP, streamed:
         closed loop   U users (16) for --duration s; output tokens/s over the run
         at once       BURSTS times U requests sent at once (request i: mix entry i mod the mix's
                       size), as the peers run; tokens/s = U x M / (first send -> last end),
                       averaged over the bursts
then the server is stopped (when this run started it) and, on the same fixed prompt, U requests x
the workload's output tokens at once:
         transformers generate / generate_batch, base and PEFT adapter (the first adapter at r_max)
         vLLM base and LoRA, when --vllm-python names a venv with vLLM (its offline engine)
and, with --vllm-python, the base model served by `vllm serve` over HTTP: the same client and
burst as ours (U streamed /v1/completions at once, BURSTS times; loadtest/vllm_serve.py)
and, where scripts/build_llama_cpp.sh has built it and the model has a GGUF file, llama.cpp's
llama-server over HTTP on that file with the same PEFT adapter converted by its own converter: base,
the LoRA, mixed LoRA scales 1/0/0.5 (it cannot serve a sub-rank), one user (loadtest/llama_cpp.py)
goals    (ours at once, the like-for-like workload) > vLLM serve base over HTTP; > vLLM offline base;
         >= 4 x vLLM LoRA; >= 1.5 x static generate with PEFT; >= 2 x generate_batch (its PEFT run;
         the base run if PEFT failed); >= 3 x llama.cpp's mixed LoRA scales
"""

from __future__ import annotations

import asyncio
import logging
import statistics

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest import openloop, peers, plots
from matryoshka_lora.loadtest.checks import Check
from matryoshka_lora.loadtest.phases import Phase, RunContext, ScenarioResult, measure
from matryoshka_lora.loadtest.scenarios.mixed import mix_entries, run_mix
from matryoshka_lora.loadtest.vllm_serve import vllm_serve_peer

log = logging.getLogger(__name__)

BURSTS = 2  # as the peers' timed runs (peers.timed)
GOALS = (  # (peer system prefix, factor ours must reach, wording)
    ("vLLM serve (base)", 1.0, "more tok/s than vLLM CPU serving the base model over HTTP"),
    ("vLLM (base)", 1.0, "more tok/s than vLLM CPU base (offline engine)"),
    ("vLLM (LoRA", 4.0, ">= 4x vLLM CPU with LoRA"),
    ("transformers generate (PEFT", 1.5, ">= 1.5x static generate with PEFT"),
    ("transformers generate_batch (PEFT", 2.0, ">= 2x generate_batch"),
    ("llama.cpp (mixed LoRA scales", 3.0, ">= 3x llama.cpp's mixed LoRA scales"),
)


def peer_goal(ours: float | None, rows: list[dict], prefix: str, factor: float, wording: str) -> Check:
    """Met / not met; `passed=None` when the peer was not measured."""
    row = next((r for r in rows if r["system"].startswith(prefix) and r["output_tok_s"]), None)
    if row is None and prefix.startswith("transformers generate_batch"):
        row = next((r for r in rows if r["system"] == "transformers generate_batch (base)" and r["output_tok_s"]), None)
    if row is None or not ours:
        return Check(wording, None, "not measured", "goal")
    ratio = ours / row["output_tok_s"]
    return Check(
        wording,
        ratio >= factor if factor > 1 else ratio > factor,
        f"{ours:.1f} vs {row['output_tok_s']:.1f} tok/s ({row['system']}): {ratio:.2f}x",
        "goal",
    )


def burst_phases(ctx: RunContext, num_requests: int) -> list[Phase]:
    """BURSTS phases of `num_requests` requests of the mixed mix sent at once, one after another."""
    plan = ctx.plan(mix_entries(ctx), tag="at once")
    return [
        measure(
            ctx,
            f"mix, {num_requests} at once ({i + 1}/{BURSTS})",
            lambda: asyncio.run(openloop.burst(ctx.url, plan, num_requests)),
        )
        for i in range(BURSTS)
    ]


def llama_cpp_results(ctx: RunContext, peft_dir, num_requests: int, max_tokens: int) -> tuple[list, str | None]:
    """(llama.cpp's PeerResults, None), or ([], why it was not run)."""
    import os

    from matryoshka_lora.loadtest.llama_cpp import convert_lora, find_llama_cpp, llama_cpp_peers
    from matryoshka_lora.loadtest.peers import PeerResult
    from matryoshka_lora.models import gguf_source, resolve_model_dir

    build, model_file = find_llama_cpp(), gguf_source(ctx.config.model)
    if build is None or model_file is None:
        why = "it is not built (bash scripts/build_llama_cpp.sh)" if build is None else "the model has no GGUF file"
        return [], f"llama.cpp not run: {why}"
    workdir = ctx.out / "peers"
    try:
        lora = convert_lora(build, peft_dir, resolve_model_dir(ctx.config.model), workdir / "lora.gguf")
    except Exception as exc:  # the run goes on without it
        log.warning("llama.cpp's converter failed: %s", exc)
        return [PeerResult("llama.cpp (LoRA)", None, num_requests, max_tokens, error=str(exc))], None
    threads = ctx.config.num_threads or os.cpu_count() or 1
    results = llama_cpp_peers(
        build, model_file, lora, ctx.prompt, num_requests, max_tokens, max_tokens, threads, workdir, BURSTS
    )
    return results, None


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("peers")
    dirs = ctx.state.get("adapter_dirs", {})
    adapter = ctx.primary
    if adapter.name not in dirs:
        raise ConfigError("--adapters", sorted(dirs), f"the directory of adapter {adapter.name!r} (peers load it)")
    users = max(ctx.config.users)
    mix_phase = run_mix(ctx, users, ctx.config.phase_s)
    bursts = burst_phases(ctx, users)
    result.phases += [mix_phase, *bursts]
    rates = [p.summary["output_tok_s"] for p in bursts]
    ours = statistics.fmean(rates) if all(rates) else None
    closed_loop = mix_phase.summary["output_tok_s"]
    if ctx.server is not None:
        ctx.server.stop()  # the peers get the whole machine, as the server had it
    from matryoshka_lora.adapters.peft_io import export_peft

    peft_dir = export_peft(
        dirs[adapter.name], adapter.r_max, ctx.out / "peers" / f"peft-{adapter.name}-r{adapter.r_max}"
    )
    prompts = [list(ctx.prompt_ids) for _ in range(users)]
    max_tokens = ctx.workload.output_tokens
    results = peers.transformers_peers(ctx.config.model, peft_dir, prompts, max_tokens, ctx.config.num_threads)
    if ctx.config.vllm_python is not None:
        from matryoshka_lora.models import resolve_model_dir

        model_dir = resolve_model_dir(ctx.config.model)
        results += peers.vllm_peers(
            ctx.config.vllm_python, model_dir, peft_dir, prompts, max_tokens, ctx.config.num_threads, ctx.out / "peers"
        )
        results.append(
            vllm_serve_peer(
                ctx.config.vllm_python,
                model_dir,
                ctx.prompt,
                len(ctx.prompt_ids),
                users,
                max_tokens,
                ctx.config.num_threads,
                ctx.out / "peers",
                repeats=BURSTS,
            )
        )
    else:
        result.notes.append("vLLM not run: pass --vllm-python VENV/bin/python (a venv with vLLM, e.g. .venv-vllm)")
    llama_results, why_not = llama_cpp_results(ctx, peft_dir, users, max_tokens)
    results += llama_results
    if why_not:
        result.notes.append(why_not)
    rows = [
        {
            "system": f"matryoshka-lora (mixed ranks, {users} at once, HTTP streaming)",
            "output_tok_s": ours,
            "ours": True,
        },
        {
            "system": f"matryoshka-lora (mixed ranks, {users} closed-loop users, HTTP streaming)",
            "output_tok_s": closed_loop,
            "ours": True,
        },
    ]
    rows += peers.as_rows(results)
    for r in rows:
        r["ratio_ours_over"] = round(ours / r["output_tok_s"], 3) if ours and r["output_tok_s"] else None
    result.tables["throughput vs peers"] = rows
    result.checks += [peer_goal(ours, rows, *g) for g in GOALS]
    result.notes.append(
        f"peers: {users} requests at once x {max_tokens} tokens on the fixed "
        f"{len(ctx.prompt_ids)}-token prompt, in process (vLLM offline), and vLLM serve and llama.cpp's "
        "llama-server over HTTP (the same client and burst as ours); ours: the same number at once over "
        "HTTP (the goals' figure), and closed-loop users over HTTP"
    )
    result.plots.append(plots.peers_bars(rows, ctx.out / "peers_throughput.png"))
    return result
