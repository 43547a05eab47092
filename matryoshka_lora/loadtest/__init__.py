"""Load tests of the HTTP server: Locust scenarios (closed loop), an open-loop Poisson generator,
/metrics checks, peers side by side, and a JSON + Markdown + PNG report.

    matryoshka-lora loadtest SCENARIO [--url URL] [--model DIR] [--adapters DIR] [--duration S] [--out DIR]

Modules: config (typed settings), prompts (the fixed prompt), server (the serve subprocess), plan +
locust_user + locust_run (Locust), openloop (asyncio, aiohttp), records (one
record per request), prom (/metrics), stats, checks, phases (measured phases), probe, scenarios/*, peers + vllm_peer,
plots, report, runner (the orchestrator). See loadtests/README.md and docs/performance.md.
"""
