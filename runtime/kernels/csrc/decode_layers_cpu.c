/* The whole decoder layer stack of a small step in one call (decodes, and prompt chunks beside
 * them whose rows the per-op path's prefill attention takes, paged_prefill.h):
 * per layer RMSNorm -> fused q|k|v matmul (+ bias) -> per-head q/k RMSNorm (Qwen3) -> rotary ->
 * K/V written into the paged cache -> paged decode attention -> o-proj -> residual -> RMSNorm ->
 * gate|up matmul -> SiLU * up -> down -> residual, on bf16 activations. Each weight is either
 * kept quantized (quant_linear's panel16 layout, quant_matmul.h: the same functions as the
 * per-op kernel, so the per-op path's values) or dense bf16 in amx_linear's tile layout
 * (dense_matmul.h: float32 sums in another order than oneDNN's or the AMX tiles', so within a
 * bf16 rounding of the per-op path's values). What the call saves is the Python and ATen
 * dispatch between the ops (~40 a layer) and the OpenMP fork per op: one parallel region for the
 * whole stack, the threads meeting at a barrier between phases.
 * Built by runtime/kernels/build.py; runtime/kernels/fused_decode.py calls it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16.h"
#include "dense_matmul.h"
#include "fused_rows.h"
#include "paged_decode.h"
#include "paged_prefill.h"
#include "quant_matmul.h"

/* Per layer, int64 each: the address of the input RMSNorm weight; the q|k|v weight as W_N
 * fields: up to SEGS descriptors (fornax_quant_linear's desc; row segments of different
 * quantization kinds one after another, 0 past the last), a bf16 bias (0: none; with quantized
 * weights only with one segment) and a dense bf16 weight in the tile layout (0: quantized; then
 * no descriptors); the q and k norm weights (0: none); o as q|k|v; the post-attention RMSNorm
 * weight; gate|up and down as q|k|v; the layer's KV cache (bf16). */
#define SEGS 3
enum { W_BIAS = SEGS, W_DENSE = SEGS + 1, W_N = SEGS + 2 };
enum {
    L_NORM1 = 0,
    L_QKV = 1,
    L_QNORM = L_QKV + W_N,
    L_KNORM = L_QNORM + 1,
    L_O = L_KNORM + 1,
    L_NORM2 = L_O + W_N,
    L_GU = L_NORM2 + 1,
    L_DOWN = L_GU + W_N,
    L_CACHE = L_DOWN + W_N,
    L_N
};
/* shape: hidden, heads, kv heads, head_dim, intermediate, rotary_dim, block size, whether
 * dense weights run on the AMX tiles (the caller checked the CPU and asked for the tile state). */
enum { S_HIDDEN, S_HEADS, S_KV_HEADS, S_HEAD_DIM, S_INTER, S_ROTARY, S_BLOCK, S_AMX, S_N };

int fornax_decode_layers_fields(void) { return L_N * 100 + S_N; }

static void *addr(int64_t v) { return (void *)(intptr_t)v; }

/* One weight of a layer: its quantized row segments, each writing its columns of the bf16
 * output, or (nseg 0) one dense weight. */
typedef struct {
    Problem seg[SEGS];
    int nseg;
    Dense dense;
} Matrix;

/* The weight at f (W_N fields) for m rows of k inputs `in`, writing its n columns into out;
 * segment s quantizes its activations into qbuf + s * qstride (qstride 0: none yet, only
 * checking). Returns the total bytes of activation buffers a segment needs at most (64 for a
 * dense weight), or 0 when the weight is not n x k in a form the kernels take. */
static size_t matrix(Matrix *mx, const int64_t *f, int m, int k, int n, const uint16_t *in,
                     uint16_t *out, uint8_t *qbuf, size_t qstride, int amx) {
    size_t most = 0;
    int cols = 0;
    mx->nseg = 0;
    if (f[W_DENSE] != 0) {
        const Dense d = {addr(f[W_DENSE]), in, addr(f[W_BIAS]), out, m, n, k, n, amx};
        mx->dense = d;
        return f[0] == 0 && dense_shape_ok(n, k) ? 64 : 0;
    }
    for (int s = 0; s < SEGS && f[s] != 0; s++) {
        Problem *p = &mx->seg[s];
        const void *bias = s == 0 && (s + 1 == SEGS || f[s + 1] == 0) ? addr(f[W_BIAS]) : NULL;
        if (quant_problem(p, addr(f[s]), m, out + cols, 1, bias, 1) != 0 || p->k != k) return 0;
        p->ostride = n;
        cols += p->n;
        mx->nseg = s + 1;
        const size_t bytes = quant_buffer_bytes(p);
        most = bytes > most ? bytes : most;
        if (qstride) quant_buffers(p, qbuf + s * qstride);
    }
    return cols == n && (mx->nseg == 1 || f[W_BIAS] == 0) ? most : 0;
}

/* Row i of activations a (k values a row) quantized for every segment of mx (a dense weight
 * reads them as they are). */
static void matrix_quantize(const Matrix *mx, const uint16_t *a, int k, int i) {
    for (int s = 0; s < mx->nseg; s++)
        quantize_row(&mx->seg[s], a, 1, (int64_t)i * k, i, HAVE_VNNI);
}

/* Every segment's panels or the dense weight's units, shared among the threads (a barrier
 * after each). */
static void matrix_panels(const Matrix *mx) {
    if (mx->nseg == 0) dense_units(&mx->dense);
    for (int s = 0; s < mx->nseg; s++) quant_panels(&mx->seg[s], HAVE_VNNI);
}

/* Head hd of the q or k part of one qkv row into dst (may be src): RMSNorm over the head with
 * weight norm (0: copied as it is), then rotary. */
static void head_norm_rotary(const uint16_t *src, uint16_t *dst, int64_t norm, int D, float eps,
                             int rot, const float *cs, const float *sn) {
    if (norm != 0)
        rms_norm_row(src, addr(norm), dst, D, eps);
    else if (dst != src)
        memcpy(dst, src, (size_t)D * 2);
    rotary_head(dst, rot, cs, sn);
}

/* Adds rows of `add` into the residual x (bf16 + bf16, rounded once, as torch adds). */
static void residual_add(uint16_t *x, const uint16_t *add, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        x[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(add[i]));
}

/* Whether prompt rows can take the per-op path's prefill attention (paged_prefill.h). */
int fornax_decode_layers_prompt_rows(void) { return HAVE_PAGED_PREFILL; }

#define MAX_PROMPTS 64 /* prompt chunks in one call (a call has at most a few dozen rows) */

/* x [m, hidden] bf16: the residual stream in, the last layer's output out (before the final
 * norm). positions [m] int64; k_rows [m] int64: each token's K row in the flat cache view
 * [num_blocks * 2 * block_size, kv heads * head_dim] (V is block_size rows further); block_table
 * [m, bt_stride] and seq_lens [m] int32 as fornax_paged_decode takes them (token i is sequence i,
 * its context ending at itself); cos/sin caches float32 [max_pos, rotary_dim]. Prompt chunk j
 * (of num_prompts, each over one token) is rows [prompt_starts[j], + prompt_lens[j]): its rows'
 * attention is then the per-op path's prefill attention (paged_prefill.h), so a prompt token
 * rounds the same in this call as in a step of its own. Returns 0, -1 for a shape the kernels
 * do not take, -2 when out of memory. */
int fornax_decode_layers(const int64_t *layers, int num_layers, const int64_t *shape, float eps,
                         float scale, uint16_t *x, int m, const int64_t *positions,
                         const int64_t *k_rows, const int32_t *block_table, int64_t bt_stride,
                         const int32_t *seq_lens, int num_prompts, const int32_t *prompt_starts,
                         const int32_t *prompt_lens, const float *cos_cache, const float *sin_cache,
                         int num_threads) {
    const int hidden = (int)shape[S_HIDDEN], heads = (int)shape[S_HEADS];
    const int kv_heads = (int)shape[S_KV_HEADS], D = (int)shape[S_HEAD_DIM];
    const int inter = (int)shape[S_INTER], rot = (int)shape[S_ROTARY], bs = (int)shape[S_BLOCK];
    const int amx = HAVE_AMX_TILES && shape[S_AMX] != 0;
    const int q_size = heads * D, kv_size = kv_heads * D, qkv_n = q_size + 2 * kv_size;
    if (m <= 0 || num_layers <= 0 || !decode_attn_supported(heads, kv_heads, D, bs) || rot > D ||
        rot % 2)
        return -1;
    /* Every layer's weights checked, and the largest activation buffer a segment needs. */
    size_t qstride = 0;
    for (int l = 0; l < num_layers; l++) {
        const int64_t *ly = layers + (int64_t)l * L_N;
        Matrix mx;
        const size_t need[4] = {
            matrix(&mx, ly + L_QKV, m, hidden, qkv_n, NULL, NULL, NULL, 0, 0),
            matrix(&mx, ly + L_O, m, q_size, hidden, NULL, NULL, NULL, 0, 0),
            matrix(&mx, ly + L_GU, m, hidden, 2 * inter, NULL, NULL, NULL, 0, 0),
            matrix(&mx, ly + L_DOWN, m, inter, hidden, NULL, NULL, NULL, 0, 0)};
        for (int i = 0; i < 4; i++) {
            if (need[i] == 0) return -1;
            qstride = need[i] > qstride ? need[i] : qstride;
        }
    }
    qstride = (qstride + 63) & ~(size_t)63;
    /* bf16 activations, each 64-byte aligned: h (normed x), qkv, q (rotated), attn, o, gu, act */
    const int64_t widths[7] = {hidden, qkv_n, q_size, q_size, hidden, 2 * inter, inter};
    size_t offs[8] = {SEGS * qstride};
    for (int i = 0; i < 7; i++)
        offs[i + 1] = offs[i] + (((size_t)m * widths[i] * 2 + 63) & ~(size_t)63);
    uint8_t *buf = scratch_get(0, offs[7]);
    if (buf == NULL) return -2;
    uint16_t *h = (uint16_t *)(buf + offs[0]), *qkv = (uint16_t *)(buf + offs[1]);
    uint16_t *q = (uint16_t *)(buf + offs[2]), *attn = (uint16_t *)(buf + offs[3]);
    uint16_t *o = (uint16_t *)(buf + offs[4]), *gu = (uint16_t *)(buf + offs[5]);
    uint16_t *act = (uint16_t *)(buf + offs[6]);
    DecodeAttn a = {q,     NULL,     block_table, seq_lens, bt_stride, attn, m,
                    heads, kv_heads, D,           bs,       1,         scale};
    const int max_len = decode_attn_max_len(&a);
    const size_t attn_bytes = decode_attn_scratch_bytes(&a, max_len);
    /* prompt chunks: each reads the table row and context of its last token */
    if (num_prompts < 0 || num_prompts > MAX_PROMPTS || (num_prompts > 0 && !HAVE_PAGED_PREFILL))
        return -1;
    int32_t prompt_rows[MAX_PROMPTS], prompt_seq_lens[MAX_PROMPTS];
    for (int j = 0; j < num_prompts; j++) {
        if (prompt_starts[j] < 0 || prompt_lens[j] < 1 || prompt_starts[j] + prompt_lens[j] > m)
            return -1;
        prompt_rows[j] = prompt_starts[j] + prompt_lens[j] - 1;
        prompt_seq_lens[j] = seq_lens[prompt_rows[j]];
    }
#if HAVE_PAGED_PREFILL
    const PrefillAttn pa = {.q = q,
                            .q_stride = q_size,
                            .out_stride = q_size,
                            .bt_stride = bt_stride,
                            .out = attn,
                            .block_table = block_table,
                            .table_rows = prompt_rows,
                            .q_starts = prompt_starts,
                            .q_lens = prompt_lens,
                            .seq_lens = prompt_seq_lens,
                            .num_reqs = num_prompts,
                            .num_q_heads = heads,
                            .num_kv_heads = kv_heads,
                            .head_dim = D,
                            .block_size = bs,
                            .scale = scale};
    int64_t max_keys = 0;
    const int64_t prompt_items = num_prompts > 0 ? prefill_attn_plan(&pa, &max_keys) : 0;
    if (prompt_items < 0) return -1;
#endif
    const int64_t row = kv_size; /* one position of one cache half, in bf16 elements */
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
#ifdef _OPENMP
        const int team = omp_get_num_threads();
#else
        const int team = 1;
#endif
        void *ascratch = scratch_get(1, attn_bytes); /* this thread's, kept between calls */
#if HAVE_PAGED_PREFILL
        const int pf_ok = prompt_items == 0 || pf_scratch_reserve(max_keys, D) == 0;
#else
        const int pf_ok = 1;
#endif
        if (ascratch == NULL || !pf_ok) {
#pragma omp atomic write
            failed = 1;
        }
        for (int l = 0; l < num_layers; l++) {
            const int64_t *ly = layers + (int64_t)l * L_N;
            /* each thread's own copies of the problems, over the shared buffers */
            Matrix mq, mo, mg, md;
            matrix(&mq, ly + L_QKV, m, hidden, qkv_n, h, qkv, buf, qstride, amx);
            matrix(&mo, ly + L_O, m, q_size, hidden, attn, o, buf, qstride, amx);
            matrix(&mg, ly + L_GU, m, hidden, 2 * inter, h, gu, buf, qstride, amx);
            matrix(&md, ly + L_DOWN, m, inter, hidden, act, o, buf, qstride, amx);
            DecodeAttn la = a;
            la.cache = addr(ly[L_CACHE]);
            /* between the matmuls and the attention, rows are shared among the threads */
#pragma omp for schedule(static)
            for (int i = 0; i < m; i++) {
                uint16_t *xi = x + (int64_t)i * hidden;
                if (l > 0) residual_add(xi, o + (int64_t)i * hidden, hidden); /* last down */
                rms_norm_row(xi, addr(ly[L_NORM1]), h + (int64_t)i * hidden, hidden, eps);
                matrix_quantize(&mq, h, hidden, i);
            }
            matrix_panels(&mq);
#pragma omp for schedule(static)
            for (int i = 0; i < m; i++) {
                uint16_t *t = qkv + (int64_t)i * qkv_n, *qi = q + (int64_t)i * q_size;
                uint16_t *cache = (uint16_t *)la.cache;
                const float *cs = cos_cache + positions[i] * rot;
                const float *sn = sin_cache + positions[i] * rot;
                for (int hd = 0; hd < heads; hd++)
                    head_norm_rotary(t + (int64_t)hd * D, qi + (int64_t)hd * D, ly[L_QNORM], D, eps,
                                     rot, cs, sn);
                for (int hd = 0; hd < kv_heads; hd++) {
                    uint16_t *kh = t + q_size + (int64_t)hd * D;
                    head_norm_rotary(kh, kh, ly[L_KNORM], D, eps, rot, cs, sn);
                }
                memcpy(cache + k_rows[i] * row, t + q_size, (size_t)kv_size * 2);
                memcpy(cache + (k_rows[i] + bs) * row, t + q_size + kv_size, (size_t)kv_size * 2);
            }
            decode_attn_items(&la, max_len, team, ascratch);
#if HAVE_PAGED_PREFILL
            if (prompt_items > 0) { /* the prompt rows again, as the per-op path attends them */
                PrefillAttn lp = pa;
                lp.cache = la.cache;
                prefill_attn_items(&lp, prompt_items, pf_ok);
            }
#endif
#pragma omp for schedule(static)
            for (int i = 0; i < m; i++) matrix_quantize(&mo, attn, q_size, i);
            matrix_panels(&mo);
#pragma omp for schedule(static)
            for (int i = 0; i < m; i++) {
                uint16_t *xi = x + (int64_t)i * hidden;
                residual_add(xi, o + (int64_t)i * hidden, hidden);
                rms_norm_row(xi, addr(ly[L_NORM2]), h + (int64_t)i * hidden, hidden, eps);
                matrix_quantize(&mg, h, hidden, i);
            }
            matrix_panels(&mg);
#pragma omp for schedule(static)
            for (int i = 0; i < m; i++) {
                const uint16_t *g = gu + (int64_t)i * 2 * inter;
                silu_mul_row(g, g + inter, act + (int64_t)i * inter, inter);
                matrix_quantize(&md, act, inter, i);
            }
            matrix_panels(&md);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < m; i++)
            residual_add(x + (int64_t)i * hidden, o + (int64_t)i * hidden, hidden);
        dense_release();
    }
    return failed ? -2 : 0;
}
