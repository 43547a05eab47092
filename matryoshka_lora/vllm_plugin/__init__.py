"""A vLLM LoRA resolver for Matryoshka adapters: `vllm serve BASE --enable-lora` serves "ADAPTER@RANK".

Registered through the `vllm.general_plugins` entry point `matryoshka_lora` (pyproject.toml), which vLLM
loads in every one of its processes; `register()` is cheap and does nothing unless
$MATRYOSHKA_ADAPTERS_DIR is set. With VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, a request whose `model`
names an unknown LoRA reaches `MatryoshkaResolver.resolve_lora`, which exports that rank's slice
(backends/vllm_loras.py) and returns its LoRARequest; None (vLLM answers 404) for anything else.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ADAPTERS_DIR_ENV = "MATRYOSHKA_ADAPTERS_DIR"
RESOLVER_NAME = "matryoshka_lora"


def register() -> None:
    """vLLM plugin hook: register the resolver when $MATRYOSHKA_ADAPTERS_DIR names a directory."""
    root = os.environ.get(ADAPTERS_DIR_ENV)
    if not root:
        log.debug("%s is not set: the Matryoshka LoRA resolver stays off", ADAPTERS_DIR_ENV)
        return
    if not os.path.isdir(root):
        log.error("%s=%s is not a directory: the Matryoshka LoRA resolver stays off", ADAPTERS_DIR_ENV, root)
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    from matryoshka_lora.vllm_plugin.resolver import MatryoshkaResolver

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        _log_like_vllm()
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, MatryoshkaResolver(root))
        log.info("Matryoshka LoRA resolver serving ADAPTER@RANK from %s", root)


def _log_like_vllm() -> None:
    """Inside `vllm serve` our INFO lines (a resolved slice) would be dropped and, without a root handler,
    lost: log at INFO, through vLLM's handlers (or a stderr handler) when the root logger has none."""
    ours = logging.getLogger("matryoshka_lora")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
    if ours.handlers or logging.getLogger().handlers:
        return
    handlers = logging.getLogger("vllm").handlers
    if not handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        handlers = [handler]
    for handler in handlers:
        ours.addHandler(handler)
    ours.propagate = False
