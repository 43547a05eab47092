"""The native inference engine: one loop thread owns the model and serves many adapters at many ranks.

Modules, one job each:
    config          EngineConfig
    weights         HF checkpoint -> the fused layout; gguf_weights: the GGUF file's own blocks
    weight_format   which weights the linears compute on (float32 | gguf | gguf+bf16), decided at load
    linear          frozen linears for oneDNN; cpu_linear (+ cpu_gemm.c, cpu_gemm_blocks.c, cpu_gemm_int8.c,
                    cpu_gemm_amx.c): the C GEMMs;
                    bf16_linear: wide steps on a packed bfloat16 copy (AMX), narrow ones on the blocks
    torch_ops       the step's small ops in torch (the reference); cpu_kernels (+ cpu_kernels.c): in C
    llama, attention the forward as plain functions; cpu_decode (+ cpu_decode.c): a decode-only step's
                    layers in one C call, the same kernels and bits
    kv_cache        slot-based cache
    adapter_slots   adapter weights once at r_max; lora_batch: per-step groups; lora_ops: the LoRA op
    model_runner    scheduled batch -> tensors -> logits; sampler; detokenizer
    sequence, scheduler  a request's state; continuous batching with tenant fair share
    budget/         the latency-budget controller behind one object (controller.BudgetController: a
                    request's budget -> a rank, learning from steps and finished requests)
    engine          the loop
"""

from matryoshka_lora.engine.config import EngineConfig

__all__ = ["EngineConfig"]
