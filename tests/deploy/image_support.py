"""Docker for the image smoke test: a daemon, the local base image, a local torch index, build, run.

No registry is reachable here, so:
  * the daemon is Debian's dockerd, started by the test when none answers, with its data under
    ~/.cache/matryoshka-deploy/docker so that image layers are reused from one run to the next;
  * the base image is built by make_base_image.sh (debootstrap bookworm + Debian's python3 3.11), a
    stand-in for python:3.11-slim-bookworm, passed as the BASE_IMAGE build argument;
  * the PyTorch CPU index is replaced by a one-package index served on loopback from the CPU torch
    wheel this machine keeps on disk (the other packages come from PyPI, as in a real build).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from deploy_support import REPO, find_tool, missing

CACHE = Path.home() / ".cache" / "matryoshka-deploy"
SOCKET = "/tmp/matryoshka-deploy-docker.sock"
BASE_IMAGE = "matryoshka-local-base:bookworm"
TORCH_WHEEL_GLOB = "torch-2.13.0+cpu-cp311-*.whl"
TORCH_INDEX_PORT = 38117


def docker(*args: str, env: dict, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([find_tool("docker"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _answers(env: dict) -> bool:
    return docker("version", "--format", "{{.Server.Version}}", env=env, check=False, timeout=20).returncode == 0


@contextlib.contextmanager
def docker_daemon() -> Iterator[dict]:
    """Yield the environment (DOCKER_HOST) of a working daemon: the caller's, else one started here."""
    env = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder: no buildx plugin is needed
    if _answers(env):
        yield env
        return
    env["DOCKER_HOST"] = f"unix://{SOCKET}"
    if _answers(env):
        yield env
        return
    dockerd = "/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").is_file() else find_tool("dockerd")
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "dockerd.log"
    args = [
        dockerd,
        f"--data-root={CACHE / 'docker'}",
        "--exec-root=/tmp/matryoshka-deploy-exec",
        "--pidfile=/tmp/matryoshka-deploy-dockerd.pid",
        f"--host=unix://{SOCKET}",
    ]
    daemon = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _answers(env):
            if daemon.poll() is not None or time.monotonic() > deadline:
                missing("dockerd did not start", f"see {log}")
            time.sleep(1)
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def base_image(env: dict) -> str:
    """The local bookworm + python3 base image, built once (its root filesystem cached under CACHE)."""
    if docker("image", "inspect", BASE_IMAGE, env=env, check=False).returncode == 0:
        return BASE_IMAGE
    find_tool("debootstrap")
    result = subprocess.run(
        ["bash", str(Path(__file__).with_name("make_base_image.sh")), BASE_IMAGE, str(CACHE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise AssertionError(f"make_base_image.sh failed:\n{result.stdout}\n{result.stderr}")
    return BASE_IMAGE


@contextlib.contextmanager
def local_torch_index() -> Iterator[str | None]:
    """A PEP 503 index with only the CPU torch wheel kept on this machine, on loopback; None if absent."""
    dirs = [Path(d) for d in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()]
    wheels = sorted(w for d in dirs if d.is_dir() for w in d.glob(TORCH_WHEEL_GLOB))
    if not wheels:
        yield None
        return
    with tempfile.TemporaryDirectory() as root:
        project = Path(root) / "simple" / "torch"
        project.mkdir(parents=True)
        (Path(root) / wheels[-1].name).symlink_to(wheels[-1])
        (project / "index.html").write_text(f'<a href="../../{wheels[-1].name}">{wheels[-1].name}</a>\n')
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
        handler.log_message = lambda *args: None
        try:  # a fixed port keeps the build argument, hence Docker's layer cache, the same between runs
            server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
        except OSError:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/simple"
        finally:
            server.shutdown()
            server.server_close()


def build_cpu_image(env: dict, tag: str, log: Path) -> str:
    """`docker build --target cpu` of the repository (niced: the machine is shared); returns its log."""
    with local_torch_index() as torch_index:
        args = [
            find_tool("docker"),
            "build",
            "--network=host",
            "--target=cpu",
            f"--tag={tag}",
            f"--build-arg=BASE_IMAGE={base_image(env)}",
        ]
        if torch_index:
            args.append(f"--build-arg=TORCH_INDEX_URL={torch_index}")
        with log.open("w") as out:
            result = subprocess.run(
                ["nice", "-n", "10", *args, str(REPO)], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900
            )
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise AssertionError(f"docker build failed ({result.returncode}):\n" + "\n".join(text.splitlines()[-40:]))
    if env.get("DOCKER_HOST") == f"unix://{SOCKET}":  # our own daemon: drop the images this build replaced
        with contextlib.suppress(subprocess.TimeoutExpired):  # best effort; the daemon finishes it anyway
            docker("image", "prune", "--force", env=env, check=False, timeout=300)
    return text
