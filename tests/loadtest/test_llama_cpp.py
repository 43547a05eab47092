"""The llama.cpp peer (loadtest/llama_cpp.py) against a scripted llama-server: its flags, every workload's
bursts with the LoRA scales per request, a server that does not start as rows with errors; and, where
scripts/build_llama_cpp.sh has built it, the real llama-server on the shipped GGUF file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from matryoshka_lora.loadtest.llama_cpp import LlamaCpp, LlamaServerProcess, find_llama_cpp, llama_cpp_peers

SCRIPT = Path(__file__).with_name("scripted_llama_server.py")


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    """A LlamaCpp whose llama-server is the scripted one (an executable wrapper), and its request log."""
    server = tmp_path / "llama-server"
    server.write_text(f'#!/bin/sh\nexec {sys.executable} {SCRIPT} "$@"\n')
    server.chmod(0o755)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("SCRIPTED_LLAMA_LOG", str(log))
    return LlamaCpp(server, tmp_path), log


def test_command_loads_the_lora_unapplied(tmp_path):
    proc = LlamaServerProcess(
        LlamaCpp(Path("/bin/llama-server"), tmp_path), Path("/m.gguf"), Path("/l.gguf"), 16, 300, 2, tmp_path / "log"
    )
    cmd = proc.command()
    assert cmd[:3] == ["/bin/llama-server", "-m", "/m.gguf"] and proc.ready_path == "/health"
    assert cmd[cmd.index("-np") + 1] == "16" and cmd[cmd.index("-c") + 1] == str(16 * 300)
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("--lora") + 1] == "/l.gguf"
    assert "--lora-init-without-apply" in cmd and cmd[cmd.index("--port") + 1] == str(proc.port)


def test_every_workload_sends_its_lora_scales(scripted, tmp_path):
    llama, log = scripted
    results = llama_cpp_peers(llama, Path("/m.gguf"), Path("/l.gguf"), "hello " * 20, 3, 5, 7, 2, tmp_path, repeats=1)
    assert [r.error for r in results] == [None] * 5 and all(r.output_tok_s > 0 for r in results)
    assert [(r.num_requests, r.max_tokens) for r in results] == [(3, 5), (3, 5), (3, 5), (1, 7), (1, 7)]
    bodies = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(b["ignore_eos"] and b["temperature"] == 0.0 and b["stream"] for b in bodies)
    timed = [b["lora"][0]["scale"] for b in bodies if b["max_tokens"] == 5]  # the bursts' requests, in any order
    assert [sorted(timed[i : i + 3]) for i in (0, 3, 6)] == [[0.0] * 3, [1.0] * 3, [0.0, 0.5, 1.0]]
    assert [b["lora"][0]["scale"] for b in bodies if b["max_tokens"] == 7] == [1.0, 0.0]
    assert "--lora-init-without-apply" in json.loads(Path(str(log) + ".argv").read_text())


def test_a_server_that_does_not_start_gives_rows_with_errors(tmp_path):
    results = llama_cpp_peers(LlamaCpp(Path("/bin/false"), tmp_path), Path("/m.gguf"), None, "hi", 2, 4, 4, 1, tmp_path)
    assert len(results) == 5 and all(r.output_tok_s is None and "ServerStartError" in r.error for r in results)


def test_find_llama_cpp_needs_the_server_and_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRYOSHKA_LLAMA_CPP", str(tmp_path))
    assert find_llama_cpp() is None
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "bin" / "llama-server").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "build" / "bin" / "llama-server", 0o755)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "convert_lora_to_gguf.py").write_text("")
    assert find_llama_cpp() == LlamaCpp(tmp_path / "build" / "bin" / "llama-server", tmp_path / "src")


@pytest.mark.slow
@pytest.mark.skipif(find_llama_cpp() is None, reason="llama.cpp not built here (bash scripts/build_llama_cpp.sh)")
def test_real_llama_server_with_a_converted_adapter(default_model, tmp_path):
    """The shipped adapter exported as PEFT, converted by llama.cpp's own converter, served: every workload runs."""
    from matryoshka_lora.adapters.peft_io import export_peft
    from matryoshka_lora.loadtest.llama_cpp import convert_lora
    from matryoshka_lora.models import default_gguf_path, default_model_dir

    llama = find_llama_cpp()
    root = Path(__file__).parents[2]
    peft_dir = export_peft(root / "adapters" / "reverse-matryoshka", 32, tmp_path / "peft")
    lora = convert_lora(llama, peft_dir, default_model_dir(), tmp_path / "lora.gguf")
    results = llama_cpp_peers(llama, default_gguf_path(), lora, "Reverse: a b c", 2, 4, 4, 2, tmp_path, repeats=1)
    assert [r.error for r in results] == [None] * 5, (tmp_path / "llama-server.log").read_text()[-2000:]


CONVERTER = """import sys
args = sys.argv[1:]
open(args[args.index("--outfile") + 1], "wb").write(b"GGUF")
"""


def peers_context(tmp_path, model_dir):
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(model=str(model_dir), num_threads=1), out=tmp_path, prompt="hi " * 20)


def test_the_peers_scenario_runs_llama_cpp_on_the_models_gguf_file(scripted, tmp_path, monkeypatch):
    from matryoshka_lora.loadtest.scenarios.peers import llama_cpp_results

    llama, log = scripted
    (llama.source / "convert_lora_to_gguf.py").write_text(CONVERTER)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr("matryoshka_lora.loadtest.llama_cpp.find_llama_cpp", lambda: llama)
    results, why_not = llama_cpp_results(peers_context(tmp_path, model_dir), tmp_path / "peft", 3, 5)
    assert why_not is None and [r.error for r in results] == [None] * 5
    assert [r.system.split(",")[0] for r in results][:3] == [
        "llama.cpp (base)",
        "llama.cpp (LoRA)",
        "llama.cpp (mixed LoRA scales 1/0/0.5)",
    ]
    argv = json.loads(Path(str(log) + ".argv").read_text())
    assert str(model_dir / "weights.gguf") in argv and str(tmp_path / "peers" / "lora.gguf") in argv


@pytest.mark.parametrize("built, has_gguf, why", [(False, True, "not built"), (True, False, "no GGUF file")])
def test_the_peers_scenario_says_why_llama_cpp_did_not_run(scripted, tmp_path, monkeypatch, built, has_gguf, why):
    from matryoshka_lora.loadtest.scenarios.peers import llama_cpp_results

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    if has_gguf:
        (model_dir / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr("matryoshka_lora.loadtest.llama_cpp.find_llama_cpp", lambda: scripted[0] if built else None)
    results, why_not = llama_cpp_results(peers_context(tmp_path, model_dir), tmp_path / "peft", 3, 5)
    assert results == [] and why in why_not
