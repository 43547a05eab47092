"""The orchestrator of `matryoshka-lora loadtest SCENARIO` (plain Python; Locust runs in subprocesses).

prepare   the scenario's server options (a tenants file, a small queue) and state
target    --url, or `matryoshka-lora serve` on a free loopback port (random adapters at r_max for
          the model under OUT/adapters when --adapters is not given), ready once /ready is 200
context   the fixed prompt (exact token count, model's tokenizer), the served adapters (/v1/adapters),
          whether the server honours `ignore_eos` (its OpenAPI schema)
run       a warm-up phase (each adapter at each sweep rank, twice), then the scenario
          (rank-sweep --peers: then the peers)
report    OUT/result.json, OUT/report.md, PNG plots
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest.config import LoadTestConfig
from matryoshka_lora.loadtest.phases import AdapterSpec, RunContext, ScenarioResult
from matryoshka_lora.loadtest.probe import warm_up
from matryoshka_lora.loadtest.prompts import exact_prompt, load_tokenizer
from matryoshka_lora.loadtest.report import command_line, machine_info, write_report
from matryoshka_lora.loadtest.scenarios import SCENARIO_MODULES
from matryoshka_lora.loadtest.server import ServerProcess, serve_args

log = logging.getLogger(__name__)

RANDOM_ADAPTERS = ("lt-a", "lt-b")


def make_random_adapters(model: str | None, root: Path, r_max: int) -> list[Path]:
    """Two Matryoshka-format adapters with random A and non-zero B (so ranks differ) for `model`."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    hf_model, _ = load_base_model(model)
    paths = [
        save_random_adapter(hf_model, root / name, name, r_max, seed=seed, std=0.02)
        for seed, name in enumerate(RANDOM_ADAPTERS, start=1)
    ]
    log.info("made random adapters %s (r_max %d) under %s", list(RANDOM_ADAPTERS), r_max, root)
    return paths


def adapter_dirs_by_name(paths: list[Path]) -> dict[str, Path]:
    from matryoshka_lora.adapters.store import adapter_dirs, read_manifest

    return {read_manifest(d).name: Path(d) for p in paths for d in adapter_dirs(p)}


def served_adapters(url: str, api_key: str | None) -> list[AdapterSpec]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/v1/adapters", headers=headers, timeout=30)
    response.raise_for_status()
    specs = [AdapterSpec(a["name"], a["r_max"], tuple(a["train_ranks"])) for a in response.json()["data"]]
    if not specs:
        raise ConfigError("adapters of the server", [], "at least one loaded adapter")
    return sorted(specs, key=lambda a: a.name)


def honours_ignore_eos(url: str) -> bool:
    """Whether POST /generate accepts `ignore_eos` (it refuses unknown fields)."""
    try:
        schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
        return "ignore_eos" in schema["components"]["schemas"]["GenerateRequest"]["properties"]
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def build_context(config: LoadTestConfig, url: str, server, prepared: dict, dirs: dict[str, Path]) -> RunContext:
    api_key = prepared.get("api_key") or config.api_key
    tokenizer = load_tokenizer(config.model)
    prompt, prompt_ids = exact_prompt(tokenizer, config.workload.prompt_tokens)
    workload, notes = config.workload, []
    if workload.ignore_eos and not honours_ignore_eos(url):
        workload = dataclasses.replace(workload, ignore_eos=False)
        notes.append(
            "the server does not accept `ignore_eos`: requests may stop early at EOS, so output lengths "
            "vary (tokens/s still count the tokens generated)"
        )
        log.warning(notes[-1])
    return RunContext(
        config=config,
        url=url,
        out=config.out,
        prompt=prompt,
        prompt_ids=prompt_ids,
        workload=workload,
        adapters=served_adapters(url, api_key),
        server=server,
        api_key=api_key,
        state={**prepared.get("state", {}), "adapter_dirs": dirs},
        notes=notes,
    )


def run_scenarios(ctx: RunContext) -> ScenarioResult:
    """A warm-up phase, then the scenario (rank-sweep --peers: then the peers)."""
    warm = warm_up(ctx)
    result = SCENARIO_MODULES[ctx.config.scenario].run(ctx)
    result.phases.insert(0, warm)
    if ctx.config.peers and ctx.config.scenario == "rank-sweep":
        more = SCENARIO_MODULES["peers"].run(ctx)
        result.phases += more.phases
        result.tables.update(more.tables)
        result.checks += more.checks
        result.plots += more.plots
        result.notes += more.notes
    return result


def run(config: LoadTestConfig) -> tuple[ScenarioResult, Path]:
    """Run one scenario end to end; returns its result and the Markdown report's path."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    started, t0, machine = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic(), machine_info()
    module = SCENARIO_MODULES[config.scenario]
    prepared = module.prepare(config, out) if hasattr(module, "prepare") else {}
    with ExitStack() as stack:
        server = None
        if config.url is None:
            adapters = config.adapters or make_random_adapters(config.model, out / "adapters", config.r_max)
            args = serve_args(
                config.model, adapters, config.num_threads, config.max_num_seqs, **prepared.get("serve", {})
            )
            server = stack.enter_context(ServerProcess(args, out / "server.log"))
            url = server.url
        else:
            adapters, url = config.adapters, config.url
        ctx = build_context(config, url, server, prepared, adapter_dirs_by_name(adapters))
        result = run_scenarios(ctx)
    info = {
        "command": command_line(),
        "started": started,
        "elapsed_s": time.monotonic() - t0,
        "machine": machine,
        "machine_end": machine_info(),
    }
    _, md_path = write_report(ctx, result, info)
    log.info("report: %s (%s)", md_path, "all invariants hold" if result.passed else "INVARIANTS FAILED")
    return result, md_path
