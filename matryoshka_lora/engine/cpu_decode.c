/* A decode step's transformer layers in one call (loaded with ctypes; cpu_decode.py builds the tables).

   For a step whose every row is one sequence's decode token, ml_decode_layers runs, layer by layer,
   what llama.forward runs with CKernelOps, the same kernels in the same order, so the same bits:

       h   = rms_norm(x, in_norm)
       qkv = linear(h, W_qkv)      + lora(h, "qkv")        each LoRA group of the step in turn
       rope_and_cache(qkv);  a = decode_attention(q, cache[layer])
       t   = linear(a, W_o)        + lora(a, "o");         x += t
       h   = rms_norm(x, post_norm)
       gu  = linear(h, W_gate_up)  + lora(h, "gate_up")
       m   = silu_mul(gu)
       t   = linear(m, W_down)     + lora(m, "down");      x += t

   One user's decode step is ~400 such calls of a few microseconds of work each; from Python each also
   costs a few microseconds of dispatch, as much as the bytes it reads. Here they cost nothing.

   Tables (int64, addresses as integers):
     layers [num_layers][LAYER_FIELDS]: in_norm, post_norm, then per linear (qkv, o, gate_up, down):
         kind (KIND_Q4_1 / KIND_Q8_0: GGUF block records, ml_linear_blocks; KIND_PANELS: float32 panels,
         ml_linear), weights, bias (0: none)
     dims: hidden, num_heads, num_kv_heads, head_dim, intermediate
     groups [num_groups][GROUP_FIELDS]: start row, rows, rank, row_ranks (0: all at rank), row_scales
         (0: all at group_scales[g]), the adapter's table [num_layers][NUM_LINEARS][LORA_FIELDS]:
         a_panels (0: no weights for this linear), b_panels, c0, c1 (ml_lora_group's), members, r_max, bf16
   scratch: rows * (2 hidden + qkv width + q size + 3 intermediate) floats; lora_scratch: what the
   largest ml_lora_group call takes (2 rows members rank); attn_scale: 1 / sqrt(head_dim). Returns ml_decode_attention's status. */

#include <stdint.h>

#include "cpu_gemm.h"
#include "cpu_kernels.h"

#define KIND_PANELS 2
#define NUM_LINEARS 4 /* qkv, o, gate_up, down */
#define LAYER_FIELDS (2 + 3 * NUM_LINEARS)
#define GROUP_FIELDS 6
#define LORA_FIELDS 7

enum { QKV, O, GATE_UP, DOWN };

typedef struct {
    int64_t num_groups;
    const int64_t *groups;
    const float *scales;
    float *scratch;
    int64_t num_threads;
} lora_step;

/* y[rows, out] = x[rows, in] @ W.T + b, then y += each group's LoRA delta for (layer, linear) */
static void linear_lora(const int64_t *layer_row, int64_t layer, int linear, const float *x, int64_t rows,
                        int64_t in, int64_t out, float *y, const lora_step *lora) {
    const int64_t *w = layer_row + 2 + 3 * linear;
    const int64_t threads = lora->num_threads;
    if (w[0] == KIND_PANELS)
        ml_linear(x, in, rows, in, (const float *)(intptr_t)w[1], out, (const float *)(intptr_t)w[2], y, out, threads);
    else
        ml_linear_blocks(x, in, rows, in, (const uint8_t *)(intptr_t)w[1], w[0], out, (const float *)(intptr_t)w[2],
                         y, out, threads);
    for (int64_t g = 0; g < lora->num_groups; g++) {
        const int64_t *grp = lora->groups + g * GROUP_FIELDS;
        const int64_t *e = (const int64_t *)(intptr_t)grp[5] + (layer * NUM_LINEARS + linear) * LORA_FIELDS;
        if (e[0] == 0) /* this adapter has no weights on this linear */
            continue;
        const int64_t start = grp[0];
        ml_lora_group(x + start * in, in, grp[1], in, (const void *)(intptr_t)e[0], e[4], grp[2], e[5],
                      (const int64_t *)(intptr_t)grp[3], (const float *)(intptr_t)grp[4], lora->scales[g],
                      (const int64_t *)(intptr_t)e[1], (const int64_t *)(intptr_t)e[2], (const int64_t *)(intptr_t)e[3],
                      y + start * out, out, lora->scratch, threads, e[6]);
    }
}

static void add_rows(float *x, const float *t, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += t[i];
}

int ml_decode_layers(float *x, int64_t rows, int64_t num_layers, const int64_t *layers, const int64_t *dims, float eps,
                     void *cache, int64_t cache_bf16, int64_t layer_stride, int64_t kv_stride, int64_t slot_stride,
                     int64_t max_len,
                     const int64_t *slots, const int64_t *positions, const int64_t *lengths, const float *cos,
                     const float *sin, int64_t num_groups, const int64_t *groups, const float *group_scales,
                     float attn_scale, float *scratch, float *lora_scratch, int64_t num_threads) {
    const int64_t hidden = dims[0], num_heads = dims[1], num_kv_heads = dims[2], head_dim = dims[3];
    const int64_t inter = dims[4], q_size = num_heads * head_dim, width = q_size + 2 * num_kv_heads * head_dim;
    float *h = scratch, *t = h + rows * hidden, *qkv = t + rows * hidden, *a = qkv + rows * width;
    float *gu = a + rows * q_size, *m = gu + rows * 2 * inter;
    const lora_step lora = {num_groups, groups, group_scales, lora_scratch, num_threads};
    int64_t row_index[rows]; /* decode attention's rows: every row of the step, in order */
    for (int64_t r = 0; r < rows; r++) row_index[r] = r;
    const int64_t item = cache_bf16 ? 2 : 4; /* bytes per cache element; the strides count elements */
    for (int64_t l = 0; l < num_layers; l++) {
        const int64_t *row = layers + l * LAYER_FIELDS;
        char *k_cache = (char *)cache + l * layer_stride * item, *v_cache = k_cache + kv_stride * item;
        ml_rms_norm(x, hidden, (const float *)(intptr_t)row[0], h, rows, hidden, eps);
        linear_lora(row, l, QKV, h, rows, hidden, width, qkv, &lora);
        ml_rope_and_cache(qkv, rows, width, num_heads, num_kv_heads, head_dim, cos, sin, k_cache, v_cache, slots,
                          positions, slot_stride, max_len, cache_bf16);
        const int status = ml_decode_attention(qkv, width, k_cache, v_cache, row_index, slots, lengths, a, q_size, rows,
                                               num_heads, num_kv_heads, head_dim, slot_stride, max_len, attn_scale,
                                               num_threads, cache_bf16);
        if (status != 0)
            return status;
        linear_lora(row, l, O, a, rows, q_size, hidden, t, &lora);
        add_rows(x, t, rows * hidden);
        ml_rms_norm(x, hidden, (const float *)(intptr_t)row[1], h, rows, hidden, eps);
        linear_lora(row, l, GATE_UP, h, rows, hidden, 2 * inter, gu, &lora);
        ml_silu_mul(gu, rows, inter, m);
        linear_lora(row, l, DOWN, m, rows, inter, hidden, t, &lora);
        add_rows(x, t, rows * hidden);
    }
    return 0;
}
