/* Paged prefill attention on the CPU (bf16, AVX512-BF16): many query tokens per request, causal,
 * keys and values read from the paged KV cache (layout per layer
 * [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]) after this step's K/V were written.
 *
 * Work items are (request, kv head, tile of query tokens). An item copies the keys and values its
 * tile can see into a thread-local buffer in the pairing the bf16 dot-product instruction reads
 * (keys: 16 positions across the lanes, head-dim pairs along the instruction's pair; values:
 * head-dim across the lanes, position pairs along the pair), so both matrix products run at 32
 * multiply-adds per instruction with float32 accumulation and no horizontal sums. Scores of six
 * query rows at a time are kept whole (a two-pass softmax, no rescaling), and the softmax weights
 * are rounded to bf16 for the value product, as GPU flash attention does.
 * Built by runtime/kernels/build.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "softmax_avx512.h"

#define ROWS 6        /* query rows (token, head) per register tile */
#define KEYS 16       /* key positions per packed block */
#define QUERY_TILE 64 /* query tokens per work item */
#define MAX_HEAD_DIM 256

typedef struct {
    uint32_t *kpack;  /* [key block][head-dim pair][16 positions] bf16 pairs */
    uint16_t *vpack;  /* [position pair][head dim][2] bf16 */
    float *scores;    /* [ROWS][padded keys] */
    uint16_t *probs;  /* [ROWS][padded keys] bf16 */
    int64_t keys_cap; /* positions the buffers hold (a multiple of 16) */
    int dim_cap;      /* head dim the packs were sized for */
} Scratch;

static __thread Scratch scratch;

static int scratch_reserve(int64_t keys, int D) {
    keys = (keys + KEYS - 1) / KEYS * KEYS; /* every row of scores starts 64-byte aligned */
    if (keys <= scratch.keys_cap && D <= scratch.dim_cap) return 0;
    if (keys < scratch.keys_cap) keys = scratch.keys_cap;
    if (D < scratch.dim_cap) D = scratch.dim_cap;
    free(scratch.kpack);
    free(scratch.vpack);
    free(scratch.scores);
    free(scratch.probs);
    scratch.kpack = aligned_alloc(64, (size_t)keys * D * 2);
    scratch.vpack = aligned_alloc(64, (size_t)keys * D * 2);
    scratch.scores = aligned_alloc(64, (size_t)ROWS * keys * 4);
    scratch.probs = aligned_alloc(64, (size_t)ROWS * keys * 2);
    scratch.keys_cap = keys;
    scratch.dim_cap = D;
    if (!scratch.kpack || !scratch.vpack || !scratch.scores || !scratch.probs) {
        scratch.keys_cap = 0;
        scratch.dim_cap = 0;
        return -1;
    }
    return 0;
}

/* Keys and values of positions [0, n) of one kv head into the scratch pairing; positions up to
 * the next multiple of 16 are zero so padded lanes stay finite. */
static void pack_kv(const uint16_t *cache, const int32_t *blocks, int n, int h, int D,
                    int block_size, int num_kv_heads) {
    const int64_t row_stride = (int64_t)num_kv_heads * D;
    const int64_t half_stride = (int64_t)block_size * row_stride;
    const int pairs = D / 2, padded = (n + KEYS - 1) / KEYS * KEYS;
    for (int pos = 0; pos < padded; pos++) {
        const int kb = pos / KEYS, j = pos % KEYS;
        uint32_t *kdst = scratch.kpack + (int64_t)kb * pairs * KEYS + j;
        uint16_t *vdst = scratch.vpack + (int64_t)(pos / 2) * 2 * D + (pos % 2);
        if (pos >= n) {
            for (int p = 0; p < pairs; p++) kdst[p * KEYS] = 0;
            for (int d = 0; d < D; d++) vdst[2 * d] = 0;
            continue;
        }
        const uint16_t *krow = cache + (int64_t)blocks[pos / block_size] * 2 * half_stride +
                               (int64_t)(pos % block_size) * row_stride + (int64_t)h * D;
        const uint32_t *k32 = (const uint32_t *)krow;
        const uint16_t *vrow = krow + half_stride;
        for (int p = 0; p < pairs; p++) kdst[p * KEYS] = k32[p];
        for (int d = 0; d < D; d++) vdst[2 * d] = vrow[d];
    }
}

/* Softmax of one row's first `n` scores (scaled already) into bf16 weights over `padded`
 * positions (zero past n); returns 1 / sum of the float32 weights. */
static float row_softmax(float *s, uint16_t *prob, int n, int padded) {
    __m512 mx = _mm512_set1_ps(-3.0e38f);
    for (int p = 0; p < n; p += 16) {
        const __mmask16 k = tail_mask16(n - p);
        mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, s + p));
    }
    return softmax_to_bf16(s, prob, n, padded, _mm512_reduce_max_ps(mx));
}

/* ROWS query rows against the packed keys/values; row r sees positions [0, lens[r]).
 * Rows past `live` repeat the last live row (computed, not written). */
static void attend_rows(const uint16_t *const *qrows, uint16_t *const *orows, const int *lens,
                        int live, int D, float scale) {
    const int pairs = D / 2;
    int nmax = 0;
    for (int r = 0; r < live; r++) nmax = lens[r] > nmax ? lens[r] : nmax;
    const int padded = (nmax + KEYS - 1) / KEYS * KEYS;
    const int64_t stride = scratch.keys_cap;
    const uint32_t *q32[ROWS];
    for (int r = 0; r < ROWS; r++) q32[r] = (const uint32_t *)qrows[r < live ? r : live - 1];
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int kb = 0; kb < padded / KEYS; kb++) {
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        const uint32_t *kp = scratch.kpack + (int64_t)kb * pairs * KEYS;
        for (int p = 0; p < pairs; p++) {
            const __m512bh kv = (__m512bh)_mm512_load_si512(kp + p * KEYS);
            for (int r = 0; r < ROWS; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)q32[r][p]), kv);
        }
        for (int r = 0; r < ROWS; r++)
            _mm512_store_ps(scratch.scores + r * stride + kb * KEYS, _mm512_mul_ps(acc[r], vscale));
    }
    float inv[ROWS];
    for (int r = 0; r < ROWS; r++)
        inv[r] = r < live ? row_softmax(scratch.scores + r * stride, scratch.probs + r * stride,
                                        lens[r], padded)
                          : 0.f;
    for (int c0 = 0; c0 < D; c0 += 64) {
        const int chunks = D - c0 >= 64 ? 4 : (D - c0) / 16;
        __m512 out[ROWS][4];
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < 4; c++) out[r][c] = _mm512_setzero_ps();
        for (int kp = 0; kp < padded / 2; kp++) {
            const uint16_t *vp = scratch.vpack + (int64_t)kp * 2 * D + 2 * c0;
            __m512bh vv[4];
            for (int c = 0; c < 4; c++)
                vv[c] = (__m512bh)(c < chunks ? _mm512_load_si512(vp + 32 * c)
                                              : _mm512_setzero_si512());
            for (int r = 0; r < ROWS; r++) {
                const int rr = r < live ? r : live - 1;
                const __m512bh w = (__m512bh)_mm512_set1_epi32(
                    *(const int32_t *)(scratch.probs + rr * stride + 2 * kp));
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

int fornax_paged_prefill_supported(void) { return 1; }

/* q, out: token rows of num_q_heads * head_dim bf16 (token strides q_stride, out_stride);
 * request i has query tokens [q_starts[i], q_starts[i] + q_lens[i]) that are the last q_lens[i]
 * of its seq_lens[i] positions, and block_table row i (bt_stride int32 per row).
 * Returns 0, or -1 for shapes outside the kernel's limits or an allocation failure. */
int fornax_paged_prefill(const uint16_t *q, int64_t q_stride, const uint16_t *cache,
                         const int32_t *block_table, int64_t bt_stride, const int32_t *q_starts,
                         const int32_t *q_lens, const int32_t *seq_lens, int num_reqs,
                         uint16_t *out, int64_t out_stride, int num_q_heads, int num_kv_heads,
                         int head_dim, int block_size, float scale, int num_threads) {
    const int D = head_dim;
    if (D % 32 || D > MAX_HEAD_DIM || num_kv_heads <= 0 || num_q_heads % num_kv_heads) return -1;
    const int G = num_q_heads / num_kv_heads;
    int64_t items = 0, max_keys = KEYS;
    for (int i = 0; i < num_reqs; i++) {
        if (q_lens[i] < 1 || q_lens[i] > seq_lens[i]) return -1;
        items += (int64_t)num_kv_heads * ((q_lens[i] + QUERY_TILE - 1) / QUERY_TILE);
        if (seq_lens[i] + KEYS > max_keys) max_keys = seq_lens[i] + KEYS;
    }
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const int ok = scratch_reserve(max_keys, D) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            /* Later tiles see more keys: hand them out first. */
            int64_t rest = items - 1 - it;
            int req = 0, tiles = 0;
            for (; req < num_reqs; req++) {
                tiles = (q_lens[req] + QUERY_TILE - 1) / QUERY_TILE;
                if (rest < (int64_t)tiles * num_kv_heads) break;
                rest -= (int64_t)tiles * num_kv_heads;
            }
            const int h = (int)(rest / tiles), tile = (int)(rest % tiles);
            const int ctx = seq_lens[req] - q_lens[req];
            const int t0 = tile * QUERY_TILE;
            const int t1 = t0 + QUERY_TILE < q_lens[req] ? t0 + QUERY_TILE : q_lens[req];
            pack_kv(cache, block_table + (int64_t)req * bt_stride, ctx + t1, h, D, block_size,
                    num_kv_heads);
            const int rows = (t1 - t0) * G;
            for (int r0 = 0; r0 < rows; r0 += ROWS) {
                const uint16_t *qrows[ROWS];
                uint16_t *orows[ROWS];
                int lens[ROWS];
                const int live = rows - r0 < ROWS ? rows - r0 : ROWS;
                for (int r = 0; r < live; r++) {
                    const int tok = t0 + (r0 + r) / G, head = h * G + (r0 + r) % G;
                    const int64_t row = q_starts[req] + tok;
                    qrows[r] = q + row * q_stride + (int64_t)head * D;
                    orows[r] = out + row * out_stride + (int64_t)head * D;
                    lens[r] = ctx + tok + 1;
                }
                attend_rows(qrows, orows, lens, live, D, scale);
            }
        }
    }
    return failed ? -1 : 0;
}

#else
int fornax_paged_prefill_supported(void) { return 0; }

int fornax_paged_prefill(const void *q, int64_t q_stride, const void *cache,
                         const int32_t *block_table, int64_t bt_stride, const int32_t *q_starts,
                         const int32_t *q_lens, const int32_t *seq_lens, int num_reqs, void *out,
                         int64_t out_stride, int num_q_heads, int num_kv_heads, int head_dim,
                         int block_size, float scale, int num_threads) {
    return -1;
}
#endif
