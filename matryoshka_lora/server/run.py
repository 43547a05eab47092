"""Run the server under uvicorn: what `matryoshka-lora serve` does once its flags are parsed.

Signals: uvicorn turns SIGTERM/SIGINT into a graceful shutdown (stop accepting, let requests in flight
finish, then the lifespan drains the engine). Afterwards uvicorn re-raises the signal; the handler set
here turns that into a clean exit (status 0), so the process behaves well as a container's PID 1.
"""

from __future__ import annotations

import logging
import math
import signal

from matryoshka_lora.server.settings import ServerSettings

log = logging.getLogger(__name__)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def uvicorn_config(app, settings: ServerSettings):
    """The uvicorn.Config that serves `app` as `settings` say."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the CLI's logging format
        log_level=settings.log_level,
        access_log=settings.access_log,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) if settings.drain_timeout_s else None,
    )


def run_server(settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT. Exits with status 1 if the engine failed to start."""
    import uvicorn

    from matryoshka_lora.server.app import create_app

    logging.getLogger().setLevel(settings.log_level.upper())
    signal.signal(signal.SIGTERM, _exit_cleanly)
    app = create_app(settings, exit_on_start_failure=True)
    server = uvicorn.Server(uvicorn_config(app, settings))
    try:
        server.run()
    finally:
        if app.state.ctx.start_error is not None:
            raise SystemExit(1)
