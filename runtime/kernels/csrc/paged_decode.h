/* Paged decode attention shared by paged_decode_cpu.c and decode_layers_cpu.c (included, not
 * built on its own): the register-tiled bf16 path, the portable path, and the loop that shares
 * the (sequence, kv head) items among the threads; paged_decode_cpu.c describes them.
 */
#ifndef FORNAX_PAGED_DECODE_H
#define FORNAX_PAGED_DECODE_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32
#define MAX_BLOCK 128 /* positions the portable path widens at a time */
#define MAX_HEADS 256
/* The register-tiled kernel prefetches this many positions ahead into L2 (into L1 the miss
 * queue fills up: 1.5x slower from DRAM on a Zen 4). */
#define PREFETCH_AHEAD 32
#define PREFETCH_HINT _MM_HINT_T1

/* exp(x) for x <= 0 (softmax after max subtraction), ~2 ulp; branch-free so loops vectorize. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = __builtin_floorf(x * 1.44269504f + 0.5f);
    const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union {
        uint32_t u;
        float f;
    } c;
    c.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * c.f;
}

/* Copy `n` rows of one kv head out of a cache block half into dst[n][D] as float32. */
static inline void widen_rows(const void *cache, int64_t base, int64_t row_stride, int n, int D,
                              int is_bf16, float *restrict dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)cache + base;
        for (int i = 0; i < n; i++) {
            const uint16_t *s = src + i * row_stride;
            float *d = dst + (int64_t)i * D;
#pragma omp simd
            for (int j = 0; j < D; j++) d[j] = bf16_to_float(s[j]);
        }
    } else {
        const float *src = (const float *)cache + base;
        for (int i = 0; i < n; i++)
            memcpy(dst + (int64_t)i * D, src + i * row_stride, (size_t)D * sizeof(float));
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "softmax_avx512.h"
#define HAVE_BF16_FAST_PATH 1

/* Sums of 16 vectors' lanes in one vector: lane 4t+u holds the sum of a[4u+t] (a 4x4 transpose
 * of the natural order, undone by the caller's slot order). 45 shuffles and adds instead of 16
 * horizontal reductions. */
static inline __attribute__((always_inline)) __m512 sum_lanes16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++)
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
    for (int m = 0; m < 4; m++)
        c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0xDD));
    for (int n = 0; n < 2; n++)
        d[n] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * n], c[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(c[2 * n], c[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Row of kv head h at position pos in cache half `half` (0: K, 1: V). */
static inline const uint16_t *cache_row(const uint16_t *cache, const int32_t *blocks, int pos,
                                        int half, int h, int D, int block_size,
                                        int64_t row_stride) {
    return cache + ((int64_t)blocks[pos / block_size] * 2 + half) * block_size * row_stride +
           (int64_t)(pos % block_size) * row_stride + (int64_t)h * D;
}

/* Kv heads [h_lo, h_hi) of one sequence with head_dim = 32 * C32 (inlined per C32 so every
 * accumulator stays in a register): scores 16 positions at a time (a dot-product chain per key,
 * then one transpose-and-add), then the values two positions per vector so the bf16 dot-product
 * instruction applies the softmax weights (rounded to bf16, as GPU kernels do), for up to
 * 16 / (2 * C32) query heads per sweep. Any block size: a score chunk stops at a block's end and
 * a value pair may span two blocks. */
static inline __attribute__((always_inline)) void
attend_head_bf16(const uint16_t *q0, const uint16_t *cache, const int32_t *blocks, int seq_len,
                 uint16_t *out0, int G, int num_kv_heads, int block_size, int h_lo, int h_hi,
                 float scale, float *restrict scores, uint16_t *restrict probs, const int C32) {
    enum { C16_MAX = MAX_HEAD_DIM / 16 };
    const int C16 = 2 * C32, D = 32 * C32, GS = 16 / C16;
    const int64_t row_stride = (int64_t)num_kv_heads * D;
    const int64_t prob_stride = (seq_len + 3) & ~1; /* even: weight pairs are 4-byte aligned */
    const __m512 vscale = _mm512_set1_ps(scale);
    const int nq = (h_hi - h_lo) * G;
    float maxs[MAX_HEADS];
    for (int j = 0; j < nq; j++) maxs[j] = -3.0e38f;
    for (int p0 = 0, m; p0 < seq_len; p0 += m) {
        const int room = block_size - p0 % block_size;
        m = seq_len - p0 < room ? seq_len - p0 : room;
        m = m < 16 ? m : 16;
        const __mmask16 live = tail_mask16(m);
        for (int h = h_lo; h < h_hi; h++) { /* all heads of a chunk: each row is read once, whole */
            const uint16_t *k0 = cache_row(cache, blocks, p0, 0, h, D, block_size, row_stride);
            if (p0 + PREFETCH_AHEAD < seq_len) {
                const char *ahead = (const char *)cache_row(cache, blocks, p0 + PREFETCH_AHEAD, 0,
                                                            h, D, block_size, row_stride);
                for (int i = 0; i < 16; i++)
                    for (int c = 0; c < C32; c++)
                        _mm_prefetch(ahead + i * row_stride * 2 + 64 * c, PREFETCH_HINT);
            }
            for (int g = 0; g < G; g++) {
                const int j = (h - h_lo) * G + g;
                const uint16_t *qg = q0 + (int64_t)j * D;
                __m512bh qv[C16_MAX / 2];
#pragma GCC unroll 8
                for (int c = 0; c < C32; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qg + 32 * c);
                __m512 dots[16];
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++) {
                    const uint16_t *k = k0 + (i < m ? i : 0) * row_stride;
                    __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
                    for (int c = 0; c < C32; c++)
                        a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
                    dots[4 * (i % 4) + i / 4] = a;
                }
                const __m512 s = _mm512_mul_ps(sum_lanes16(dots), vscale);
                _mm512_mask_storeu_ps(scores + (int64_t)j * seq_len + p0, live, s);
                const float mx = _mm512_mask_reduce_max_ps(live, s);
                maxs[j] = mx > maxs[j] ? mx : maxs[j];
            }
        }
    }
    float inv_sum[MAX_HEADS];
    for (int g = 0; g < nq; g++) {
        float *sg = scores + (int64_t)g * seq_len;
        uint16_t *pg = probs + (int64_t)g * prob_stride;
        inv_sum[g] = softmax_to_bf16(sg, pg, seq_len, seq_len + 2, maxs[g]);
    }
    /* word 2l of a pair vector = first position's element l, word 2l+1 = second's */
    /* clang-format off */
    const __m512i interleave = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    /* clang-format on */
    for (int hg = 0; hg < (h_hi - h_lo) * ((G + GS - 1) / GS); hg++) {
        const int h = h_lo + hg / ((G + GS - 1) / GS), g0 = hg % ((G + GS - 1) / GS) * GS;
        const int j0 = (h - h_lo) * G;
        __m512 acc[16];
        const int32_t *w[8]; /* GS <= 8 query heads per sweep */
#pragma GCC unroll 4
        for (int gi = 0; gi < GS; gi++) /* past G: repeat the last head, results dropped */
            w[gi] = (const int32_t *)(probs + (int64_t)(j0 + (g0 + gi < G ? g0 + gi : G - 1)) *
                                                  prob_stride);
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
        for (int p = 0; p < seq_len; p += 2) {
            const uint16_t *va = cache_row(cache, blocks, p, 1, h, D, block_size, row_stride);
            if (p + PREFETCH_AHEAD < seq_len && g0 == 0) {
                const char *ahead = (const char *)cache_row(cache, blocks, p + PREFETCH_AHEAD, 1, h,
                                                            D, block_size, row_stride);
                for (int c = 0; c < C32; c++) {
                    _mm_prefetch(ahead + 64 * c, PREFETCH_HINT);
                    _mm_prefetch(ahead + row_stride * 2 + 64 * c, PREFETCH_HINT);
                }
            }
            const int second = p + 1 < seq_len;
            const uint16_t *vb = va + row_stride;
            if (second && (block_size & 1) && (p + 1) % block_size == 0) /* spans two blocks */
                vb = cache_row(cache, blocks, p + 1, 1, h, D, block_size, row_stride);
            __m512bh vp[C16_MAX];
#pragma GCC unroll 16
            for (int c = 0; c < C16; c++) {
                const __m512i lo =
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(va + 16 * c)));
                const __m512i hi =
                    second
                        ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(vb + 16 * c)))
                        : _mm512_setzero_si512();
                vp[c] = (__m512bh)_mm512_permutex2var_epi16(lo, interleave, hi);
            }
#pragma GCC unroll 8
            for (int gi = 0; gi < GS; gi++) {
                const __m512bh wv = (__m512bh)_mm512_set1_epi32(w[gi][p / 2]);
#pragma GCC unroll 16
                for (int c = 0; c < C16; c++)
                    acc[gi * C16 + c] = _mm512_dpbf16_ps(acc[gi * C16 + c], wv, vp[c]);
            }
        }
        for (int gi = 0; gi < GS && g0 + gi < G; gi++) {
            const __m512 inv = _mm512_set1_ps(inv_sum[j0 + g0 + gi]);
            uint16_t *dst = out0 + (int64_t)(j0 + g0 + gi) * D;
            for (int c = 0; c < C16; c++)
                bf16x16_store_hw(dst + 16 * c, _mm512_mul_ps(acc[gi * C16 + c], inv), 0xffff);
        }
    }
}

/* attend_head_bf16 compiled for each head_dim it takes (32 to MAX_HEAD_DIM in steps of 32). */
static void attend_bf16(const uint16_t *q0, const uint16_t *cache, const int32_t *blocks,
                        int seq_len, uint16_t *out0, int G, int num_kv_heads, int D, int block_size,
                        int h_lo, int h_hi, float scale, float *restrict scores,
                        uint16_t *restrict probs) {
#define ATTEND_C32(c32)                                                                            \
    case c32:                                                                                      \
        attend_head_bf16(q0, cache, blocks, seq_len, out0, G, num_kv_heads, block_size, h_lo,      \
                         h_hi, scale, scores, probs, c32);                                         \
        break
    switch (D / 32) { /* one compiled copy per head_dim */
        ATTEND_C32(1);
        ATTEND_C32(2);
        ATTEND_C32(3);
        ATTEND_C32(4);
        ATTEND_C32(5);
        ATTEND_C32(6);
        ATTEND_C32(7);
        ATTEND_C32(8);
    }
#undef ATTEND_C32
}
#endif

/* The K row (of kv head 0) of position p0 in the cache, and in *n how many positions from p0 on
 * one tile takes: up to MAX_BLOCK, within p0's block (any block size) and before seq_len. */
static inline int64_t decode_tile(const int32_t *blocks, int p0, int seq_len, int block_size,
                                  int64_t half_stride, int64_t row_stride, int *n) {
    const int in_block = p0 % block_size, room = block_size - in_block;
    const int take = seq_len - p0 < room ? seq_len - p0 : room;
    *n = take < MAX_BLOCK ? take : MAX_BLOCK;
    return (int64_t)blocks[p0 / block_size] * 2 * half_stride + (int64_t)in_block * row_stride;
}

/* One (sequence, kv head) pair: G query heads attend over seq_len cached positions. */
static void attend_one(const void *q, const void *cache, const int32_t *blocks, int seq_len,
                       void *out, int64_t q_row, int G, int num_kv_heads, int D, int block_size,
                       int kv_head, float scale, int is_bf16, float *restrict scores) {
    const int64_t row_stride = (int64_t)num_kv_heads * D;         /* next position in a block */
    const int64_t half_stride = (int64_t)block_size * row_stride; /* K half -> V half */
    float qf[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM];
    float tile[MAX_BLOCK * MAX_HEAD_DIM];
    float maxv[MAX_GROUP], inv_sum[MAX_GROUP];

    widen_rows(q, q_row, D, G, D, is_bf16, qf);
    for (int j = 0; j < G * D; j++) {
        qf[j] *= scale;
        acc[j] = 0.f;
    }
    for (int g = 0; g < G; g++) maxv[g] = -3.0e38f;
    /* Pass 1: scores q.k for every cached position, a tile (up to MAX_BLOCK positions, never
     * past a block's end) at a time. */
    for (int p0 = 0, n; p0 < seq_len; p0 += n) {
        const int64_t at =
            decode_tile(blocks, p0, seq_len, block_size, half_stride, row_stride, &n);
        widen_rows(cache, at + (int64_t)kv_head * D, row_stride, n, D, is_bf16, tile);
        for (int g = 0; g < G; g++) {
            const float *qg = qf + g * D;
            float *sg = scores + (int64_t)g * seq_len + p0;
            float m = maxv[g];
            for (int i = 0; i < n; i++) {
                const float *k = tile + (int64_t)i * D;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int j = 0; j < D; j++) s += qg[j] * k[j];
                sg[i] = s;
                m = s > m ? s : m;
            }
            maxv[g] = m;
        }
    }
    for (int g = 0; g < G; g++) {
        float *sg = scores + (int64_t)g * seq_len;
        const float m = maxv[g];
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int p = 0; p < seq_len; p++) {
            const float e = exp_nonpositive(sg[p] - m);
            sg[p] = e;
            sum += e;
        }
        inv_sum[g] = 1.f / sum;
    }
    /* Pass 2: weighted sum of values. */
    for (int p0 = 0, n; p0 < seq_len; p0 += n) {
        const int64_t at =
            decode_tile(blocks, p0, seq_len, block_size, half_stride, row_stride, &n);
        widen_rows(cache, at + half_stride + (int64_t)kv_head * D, row_stride, n, D, is_bf16, tile);
        for (int g = 0; g < G; g++) {
            const float *sg = scores + (int64_t)g * seq_len + p0;
            float *ag = acc + g * D;
            for (int i = 0; i < n; i++) {
                const float w = sg[i];
                const float *v = tile + (int64_t)i * D;
#pragma omp simd
                for (int j = 0; j < D; j++) ag[j] += w * v[j];
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const float inv = inv_sum[g];
        const float *ag = acc + g * D;
        if (is_bf16) {
            uint16_t *dst = (uint16_t *)out + q_row + (int64_t)g * D;
            for (int j = 0; j < D; j++) dst[j] = float_to_bf16(ag[j] * inv);
        } else {
            float *dst = (float *)out + q_row + (int64_t)g * D;
            for (int j = 0; j < D; j++) dst[j] = ag[j] * inv;
        }
    }
}

/* One decode attention problem: q, out [num_seqs, num_q_heads, head_dim] contiguous;
 * block_table [num_seqs, bt_stride] int32; seq_lens [num_seqs] int32. */
typedef struct {
    const void *q, *cache;
    const int32_t *block_table, *seq_lens;
    int64_t bt_stride;
    void *out;
    int num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, is_bf16;
    float scale;
} DecodeAttn;

/* Whether the kernels take this shape (any block size: the portable path tiles a block). */
static int decode_attn_supported(int num_q_heads, int num_kv_heads, int head_dim, int block_size) {
    return head_dim > 0 && head_dim <= MAX_HEAD_DIM && block_size > 0 && num_kv_heads > 0 &&
           num_q_heads % num_kv_heads == 0 && num_q_heads / num_kv_heads <= MAX_GROUP;
}

/* The longest context of a (at least 1). */
static int decode_attn_max_len(const DecodeAttn *a) {
    int max_len = 1;
    for (int s = 0; s < a->num_seqs; s++)
        if (a->seq_lens[s] > max_len) max_len = a->seq_lens[s];
    return max_len;
}

/* Bytes of one thread's scratch (scores, then the bf16 weights) for contexts up to max_len. */
static size_t decode_attn_scratch_bytes(const DecodeAttn *a, int max_len) {
    const size_t scores = ((size_t)a->num_q_heads * max_len * sizeof(float) + 63) & ~(size_t)63;
    return scores + (size_t)a->num_q_heads * (max_len + 3) * 2;
}

/* Every (sequence, kv heads) item of a, shared among the threads of the enclosing OpenMP
 * parallel region (an orphaned `omp for`; num_threads: that region's size); scratch is this
 * thread's decode_attn_scratch_bytes(a, max_len), NULL: this thread skips its items (the caller
 * reports the failure). Ends with the loop's barrier. */
static void decode_attn_items(const DecodeAttn *a, int max_len, int num_threads, void *scratch) {
    const int G = a->num_q_heads / a->num_kv_heads, D = a->head_dim;
    /* Enough sequences to keep every thread busy: one item per sequence (all its heads, so each
     * block streams contiguously); otherwise one item per (sequence, kv head). */
    const int heads_per_item = a->num_seqs >= 2 * num_threads ? a->num_kv_heads : 1;
    const int per_seq = a->num_kv_heads / heads_per_item, items = a->num_seqs * per_seq;
    float *scores = (float *)scratch;
#ifdef HAVE_BF16_FAST_PATH
    const int fast = a->is_bf16 && D % 32 == 0 && a->num_q_heads <= MAX_HEADS;
    uint16_t *probs =
        scratch == NULL
            ? NULL
            : (uint16_t *)((char *)scratch +
                           (((size_t)a->num_q_heads * max_len * sizeof(float) + 63) & ~(size_t)63));
#else
    (void)max_len;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
        if (scratch == NULL) continue;
        const int s = it / per_seq, h_lo = (it % per_seq) * heads_per_item;
        const int h_hi = h_lo + heads_per_item;
        const int32_t *blocks = a->block_table + (int64_t)s * a->bt_stride;
        const int64_t seq_q_row = (int64_t)s * a->num_q_heads * D;
#ifdef HAVE_BF16_FAST_PATH
        if (fast) {
            attend_bf16((const uint16_t *)a->q + seq_q_row + (int64_t)h_lo * G * D,
                        (const uint16_t *)a->cache, blocks, a->seq_lens[s],
                        (uint16_t *)a->out + seq_q_row + (int64_t)h_lo * G * D, G, a->num_kv_heads,
                        D, a->block_size, h_lo, h_hi, a->scale, scores, probs);
            continue;
        }
#endif
        for (int h = h_lo; h < h_hi; h++)
            attend_one(a->q, a->cache, blocks, a->seq_lens[s], a->out,
                       seq_q_row + (int64_t)h * G * D, G, a->num_kv_heads, D, a->block_size, h,
                       a->scale, a->is_bf16, scores);
    }
}
#endif
