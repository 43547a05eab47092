"""The native inference engine: one loop thread owns the model and serves many adapters at many ranks.

Modules, one job each: `config` (EngineConfig), `weights` (HF checkpoint -> fused layout), `llama`
(the forward as plain functions), `kv_cache` (slot-based cache), `adapter_slots` (adapter weights
once at r_max), `lora_batch` (per-step token -> (adapter, rank) segments), `lora_ops` (reference and
segmented LoRA op), `model_runner` (scheduled batch -> tensors -> logits), `sampler`, `detokenizer`,
`sequence`, `scheduler`, `cost_model`, `engine` (the loop).
"""

from matryoshka_lora.engine.config import EngineConfig

__all__ = ["EngineConfig"]
