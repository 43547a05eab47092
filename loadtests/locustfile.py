"""Locust, interactively (web UI at http://localhost:8089) or headless, against a running server.

    matryoshka-lora serve --port 8000 &
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --mix alpha@1,alpha@8,alpha@64
    locust --config loadtests/mixed.conf          # the same, from a scenario file

Every request is a streamed POST /generate; Locust's statistics are per `ADAPTER@SERVED_RANK` and per
request type: E2E (whole request), TTFT, TPOT and ITL. Custom options (also in the web UI):
--mix, --adapter, --rank, --latency-budget-ms, --max-tokens, --prompt, --ignore-eos, --api-key,
--records FILE (JSON lines, one per request). The orchestrated scenarios (`matryoshka-lora loadtest`)
run the same user class with a plan file instead.
"""

from matryoshka_lora.loadtest.locust_user import MatryoshkaUser  # noqa: F401  (Locust collects it)
