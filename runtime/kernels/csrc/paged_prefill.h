/* Paged prefill attention on the CPU (bf16, AVX512-BF16): many query tokens per request, causal,
 * keys and values read from the paged KV cache (layout per layer
 * [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]) after this step's K/V were written.
 * Shared by paged_prefill_cpu.c (the per-op kernel) and decode_layers_cpu.c (the prompt rows of a
 * small mixed step in the fused call), so a prompt token's attention rounds the same either way.
 *
 * Work items are (request, kv head, tile of query tokens). An item copies the keys and values its
 * tile can see into a thread-local buffer in the pairing the bf16 dot-product instruction reads
 * (keys: 16 positions across the lanes, head-dim pairs along the instruction's pair; values:
 * head-dim across the lanes, position pairs along the pair), so both matrix products run at 32
 * multiply-adds per instruction with float32 accumulation and no horizontal sums. Scores of six
 * query rows at a time are kept whole (a two-pass softmax, no rescaling), and the softmax weights
 * are rounded to bf16 for the value product, as GPU flash attention does. A row's result depends
 * on its query and its keys only, not on which rows share its item.
 * Included, not built on its own.
 */
#ifndef FORNAX_PAGED_PREFILL_H
#define FORNAX_PAGED_PREFILL_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_PAGED_PREFILL 1
#include "softmax_avx512.h"

#define PF_ROWS 6        /* query rows (token, head) per register tile */
#define PF_KEYS 16       /* key positions per packed block */
#define PF_QUERY_TILE 64 /* query tokens per work item */
#define PF_MAX_HEAD_DIM 256

typedef struct {
    uint32_t *kpack;  /* [key block][head-dim pair][16 positions] bf16 pairs */
    uint16_t *vpack;  /* [position pair][head dim][2] bf16 */
    float *scores;    /* [PF_ROWS][padded keys] */
    uint16_t *probs;  /* [PF_ROWS][padded keys] bf16 */
    int64_t keys_cap; /* positions the buffers hold (a multiple of 16) */
    int dim_cap;      /* head dim the packs were sized for */
} PrefillScratch;

static __thread PrefillScratch pf_scratch;

static int pf_scratch_reserve(int64_t keys, int D) {
    keys =
        (keys + PF_KEYS - 1) / PF_KEYS * PF_KEYS; /* every row of scores starts 64-byte aligned */
    if (keys <= pf_scratch.keys_cap && D <= pf_scratch.dim_cap) return 0;
    if (keys < pf_scratch.keys_cap) keys = pf_scratch.keys_cap;
    if (D < pf_scratch.dim_cap) D = pf_scratch.dim_cap;
    free(pf_scratch.kpack);
    free(pf_scratch.vpack);
    free(pf_scratch.scores);
    free(pf_scratch.probs);
    pf_scratch.kpack = aligned_alloc(64, (size_t)keys * D * 2);
    pf_scratch.vpack = aligned_alloc(64, (size_t)keys * D * 2);
    pf_scratch.scores = aligned_alloc(64, (size_t)PF_ROWS * keys * 4);
    pf_scratch.probs = aligned_alloc(64, (size_t)PF_ROWS * keys * 2);
    pf_scratch.keys_cap = keys;
    pf_scratch.dim_cap = D;
    if (!pf_scratch.kpack || !pf_scratch.vpack || !pf_scratch.scores || !pf_scratch.probs) {
        pf_scratch.keys_cap = 0;
        pf_scratch.dim_cap = 0;
        return -1;
    }
    return 0;
}

/* Keys and values of positions [0, n) of one kv head into the pf_scratch pairing; positions up to
 * the next multiple of 16 are zero so padded lanes stay finite. */
static void pf_pack_kv(const uint16_t *cache, const int32_t *blocks, int n, int h, int D,
                       int block_size, int num_kv_heads) {
    const int64_t row_stride = (int64_t)num_kv_heads * D;
    const int64_t half_stride = (int64_t)block_size * row_stride;
    const int pairs = D / 2, padded = (n + PF_KEYS - 1) / PF_KEYS * PF_KEYS;
    for (int pos = 0; pos < padded; pos++) {
        const int kb = pos / PF_KEYS, j = pos % PF_KEYS;
        uint32_t *kdst = pf_scratch.kpack + (int64_t)kb * pairs * PF_KEYS + j;
        uint16_t *vdst = pf_scratch.vpack + (int64_t)(pos / 2) * 2 * D + (pos % 2);
        if (pos >= n) {
            for (int p = 0; p < pairs; p++) kdst[p * PF_KEYS] = 0;
            for (int d = 0; d < D; d++) vdst[2 * d] = 0;
            continue;
        }
        const uint16_t *krow = cache + (int64_t)blocks[pos / block_size] * 2 * half_stride +
                               (int64_t)(pos % block_size) * row_stride + (int64_t)h * D;
        const uint32_t *k32 = (const uint32_t *)krow;
        const uint16_t *vrow = krow + half_stride;
        for (int p = 0; p < pairs; p++) kdst[p * PF_KEYS] = k32[p];
        for (int d = 0; d < D; d++) vdst[2 * d] = vrow[d];
    }
}

/* Softmax of one row's first `n` scores (scaled already) into bf16 weights over `padded`
 * positions (zero past n); returns 1 / sum of the float32 weights. */
static float pf_row_softmax(float *s, uint16_t *prob, int n, int padded) {
    __m512 mx = _mm512_set1_ps(-3.0e38f);
    for (int p = 0; p < n; p += 16) {
        const __mmask16 k = tail_mask16(n - p);
        mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, s + p));
    }
    return softmax_to_bf16(s, prob, n, padded, _mm512_reduce_max_ps(mx));
}

/* PF_ROWS query rows against the packed keys/values; row r sees positions [0, lens[r]).
 * Rows past `live` repeat the last live row (computed, not written). */
static void pf_attend_rows(const uint16_t *const *qrows, uint16_t *const *orows, const int *lens,
                           int live, int D, float scale) {
    const int pairs = D / 2;
    int nmax = 0;
    for (int r = 0; r < live; r++) nmax = lens[r] > nmax ? lens[r] : nmax;
    const int padded = (nmax + PF_KEYS - 1) / PF_KEYS * PF_KEYS;
    const int64_t stride = pf_scratch.keys_cap;
    const uint32_t *q32[PF_ROWS];
    for (int r = 0; r < PF_ROWS; r++) q32[r] = (const uint32_t *)qrows[r < live ? r : live - 1];
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int kb = 0; kb < padded / PF_KEYS; kb++) {
        __m512 acc[PF_ROWS];
        for (int r = 0; r < PF_ROWS; r++) acc[r] = _mm512_setzero_ps();
        const uint32_t *kp = pf_scratch.kpack + (int64_t)kb * pairs * PF_KEYS;
        for (int p = 0; p < pairs; p++) {
            const __m512bh kv = (__m512bh)_mm512_load_si512(kp + p * PF_KEYS);
            for (int r = 0; r < PF_ROWS; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)q32[r][p]), kv);
        }
        for (int r = 0; r < PF_ROWS; r++)
            _mm512_store_ps(pf_scratch.scores + r * stride + kb * PF_KEYS,
                            _mm512_mul_ps(acc[r], vscale));
    }
    float inv[PF_ROWS];
    for (int r = 0; r < PF_ROWS; r++)
        inv[r] = r < live ? pf_row_softmax(pf_scratch.scores + r * stride,
                                           pf_scratch.probs + r * stride, lens[r], padded)
                          : 0.f;
    for (int c0 = 0; c0 < D; c0 += 64) {
        const int chunks = D - c0 >= 64 ? 4 : (D - c0) / 16;
        __m512 out[PF_ROWS][4];
        for (int r = 0; r < PF_ROWS; r++)
            for (int c = 0; c < 4; c++) out[r][c] = _mm512_setzero_ps();
        for (int kp = 0; kp < padded / 2; kp++) {
            const uint16_t *vp = pf_scratch.vpack + (int64_t)kp * 2 * D + 2 * c0;
            __m512bh vv[4];
            for (int c = 0; c < 4; c++)
                vv[c] = (__m512bh)(c < chunks ? _mm512_load_si512(vp + 32 * c)
                                              : _mm512_setzero_si512());
            for (int r = 0; r < PF_ROWS; r++) {
                const int rr = r < live ? r : live - 1;
                const __m512bh w = (__m512bh)_mm512_set1_epi32(
                    *(const int32_t *)(pf_scratch.probs + rr * stride + 2 * kp));
                for (int c = 0; c < 4; c++) out[r][c] = _mm512_dpbf16_ps(out[r][c], w, vv[c]);
            }
        }
        for (int r = 0; r < live; r++) {
            const __m512 vinv = _mm512_set1_ps(inv[r]);
            for (int c = 0; c < chunks; c++)
                bf16x16_store_hw(orows[r] + c0 + 16 * c, _mm512_mul_ps(out[r][c], vinv), 0xffff);
        }
    }
}

/* One call's requests: request i has query tokens [q_starts[i], q_starts[i] + q_lens[i]) of q
 * and out (token strides q_stride / out_stride, rows of num_q_heads * head_dim bf16), the last
 * q_lens[i] of its seq_lens[i] positions, and the block-table row table_rows[i] (i where
 * table_rows is NULL; bt_stride int32 a row: the fused call's table has a row per token). */
typedef struct {
    const uint16_t *q, *cache;
    int64_t q_stride, out_stride, bt_stride;
    uint16_t *out;
    const int32_t *block_table, *table_rows, *q_starts, *q_lens, *seq_lens;
    int num_reqs, num_q_heads, num_kv_heads, head_dim, block_size;
    float scale;
} PrefillAttn;

/* The number of work items, or -1 for shapes outside the kernel's limits; *max_keys: the
 * positions a thread's buffers must hold (pf_scratch_reserve). */
static int64_t prefill_attn_plan(const PrefillAttn *p, int64_t *max_keys) {
    const int D = p->head_dim;
    if (D % 32 || D > PF_MAX_HEAD_DIM || p->num_kv_heads <= 0 || p->num_q_heads % p->num_kv_heads)
        return -1;
    int64_t items = 0;
    *max_keys = PF_KEYS;
    for (int i = 0; i < p->num_reqs; i++) {
        if (p->q_lens[i] < 1 || p->q_lens[i] > p->seq_lens[i]) return -1;
        items += (int64_t)p->num_kv_heads * ((p->q_lens[i] + PF_QUERY_TILE - 1) / PF_QUERY_TILE);
        if (p->seq_lens[i] + PF_KEYS > *max_keys) *max_keys = p->seq_lens[i] + PF_KEYS;
    }
    return items;
}

/* Every work item of p, shared among the threads of the enclosing OpenMP parallel region (an
 * orphaned `omp for`, ending with its barrier); ok 0: this thread's buffers failed, it skips. */
static void prefill_attn_items(const PrefillAttn *p, int64_t items, int ok) {
    const int D = p->head_dim, G = p->num_q_heads / p->num_kv_heads;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        if (!ok) continue;
        /* Later tiles see more keys: hand them out first. */
        int64_t rest = items - 1 - it;
        int req = 0, tiles = 0;
        for (; req < p->num_reqs; req++) {
            tiles = (p->q_lens[req] + PF_QUERY_TILE - 1) / PF_QUERY_TILE;
            if (rest < (int64_t)tiles * p->num_kv_heads) break;
            rest -= (int64_t)tiles * p->num_kv_heads;
        }
        const int h = (int)(rest / tiles), tile = (int)(rest % tiles);
        const int ctx = p->seq_lens[req] - p->q_lens[req];
        const int t0 = tile * PF_QUERY_TILE;
        const int t1 = t0 + PF_QUERY_TILE < p->q_lens[req] ? t0 + PF_QUERY_TILE : p->q_lens[req];
        const int64_t trow = p->table_rows != NULL ? p->table_rows[req] : req;
        pf_pack_kv(p->cache, p->block_table + trow * p->bt_stride, ctx + t1, h, D, p->block_size,
                   p->num_kv_heads);
        const int rows = (t1 - t0) * G;
        for (int r0 = 0; r0 < rows; r0 += PF_ROWS) {
            const uint16_t *qrows[PF_ROWS];
            uint16_t *orows[PF_ROWS];
            int lens[PF_ROWS];
            const int live = rows - r0 < PF_ROWS ? rows - r0 : PF_ROWS;
            for (int r = 0; r < live; r++) {
                const int tok = t0 + (r0 + r) / G, head = h * G + (r0 + r) % G;
                const int64_t row = p->q_starts[req] + tok;
                qrows[r] = p->q + row * p->q_stride + (int64_t)head * D;
                orows[r] = p->out + row * p->out_stride + (int64_t)head * D;
                lens[r] = ctx + tok + 1;
            }
            pf_attend_rows(qrows, orows, lens, live, D, p->scale);
        }
    }
}
#else
#define HAVE_PAGED_PREFILL 0
#endif
#endif
