/* Paged decode attention on the CPU: one query token per sequence, read in place from the paged
 * KV cache (layout per layer [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]).
 *
 * Work is split over (sequence, kv head) pairs with OpenMP; every query head of a group shares one
 * pass over its kv head's keys and values, so grouped-query attention reads the cache once.
 * Each cache block is widened to float32 once, then scores, a two-pass softmax and the weighted
 * value sum run as plain loops the compiler vectorizes. Built by runtime/attention/native_kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32
#define MAX_BLOCK 128
#define MAX_HEADS 256

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)h << 16;
    return c.f;
}

static inline uint16_t float_to_bf16(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    uint32_t u = c.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                              /* round to even */
    return (uint16_t)(u >> 16);
}

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
    union { uint32_t u; float f; } c;
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
        for (int i = 0; i < n; i++) memcpy(dst + (int64_t)i * D, src + i * row_stride,
                                           (size_t)D * sizeof(float));
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_FAST_PATH 1

/* exp(x - m) over n floats in place, returning their sum (16 lanes at a time, masked tail). */
static inline float exp_shift_sum_avx512(float *x, int n, float m) {
    const __m512 vm = _mm512_set1_ps(m), lo = _mm512_set1_ps(-87.f);
    const __m512 log2e = _mm512_set1_ps(1.44269504f), ln2hi = _mm512_set1_ps(0.693145751953125f);
    const __m512 ln2lo = _mm512_set1_ps(1.428606765330187e-06f);
    __m512 total = _mm512_setzero_ps();
    for (int p = 0; p < n; p += 16) {
        const __mmask16 k = n - p >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - p)) - 1u);
        __m512 v = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + p), vm), lo);
        const __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 r = _mm512_fnmadd_ps(t, ln2lo, _mm512_fnmadd_ps(t, ln2hi, v));
        __m512 q = _mm512_set1_ps(1.9875691500e-4f);
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
        q = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
        const __m512 e = _mm512_scalef_ps(q, t);
        _mm512_mask_storeu_ps(x + p, k, e);
        total = _mm512_mask_add_ps(total, k, total, e);
    }
    return _mm512_reduce_add_ps(total);
}

/* bf16 fast path (head_dim a multiple of 32) for kv heads [h_lo, h_hi) of one sequence: scores
 * with the bf16 dot-product instruction (32 products each, float32 accumulation), values widened
 * 16 at a time. Positions are visited in cache order, so each block half streams contiguously. */
static void attend_seq_bf16(const uint16_t *q, const uint16_t *cache, const int32_t *blocks,
                            int seq_len, uint16_t *out, int64_t seq_q_row, int G,
                            int num_kv_heads, int D, int block_size, int h_lo, int h_hi,
                            float scale, float *restrict scores, __m512 *restrict acc) {
    const int64_t row_stride = (int64_t)num_kv_heads * D;
    const int64_t half_stride = (int64_t)block_size * row_stride;
    const int chunks32 = D / 32, chunks16 = D / 16, nq = (h_hi - h_lo) * G;
    const uint16_t *q0 = q + seq_q_row + (int64_t)h_lo * G * D;
    float maxv[MAX_HEADS];
    for (int j = 0; j < nq; j++) maxv[j] = -3.0e38f;
    for (int p0 = 0, b = 0; p0 < seq_len; p0 += block_size, b++) {
        const int n = seq_len - p0 < block_size ? seq_len - p0 : block_size;
        const uint16_t *blk = cache + (int64_t)blocks[b] * 2 * half_stride;
        for (int i = 0; i < n; i++) {
            for (int h = h_lo; h < h_hi; h++) {
                const uint16_t *k = blk + i * row_stride + (int64_t)h * D;
                __m512bh kc[MAX_HEAD_DIM / 32];
                for (int c = 0; c < chunks32; c++) kc[c] = (__m512bh)_mm512_loadu_si512(k + 32 * c);
                for (int g = 0; g < G; g++) {
                    const int j = (h - h_lo) * G + g;
                    const uint16_t *qj = q0 + (int64_t)j * D;
                    __m512 a = _mm512_setzero_ps();
                    for (int c = 0; c < chunks32; c++)
                        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qj + 32 * c), kc[c]);
                    const float sc = _mm512_reduce_add_ps(a) * scale;
                    scores[(int64_t)j * seq_len + p0 + i] = sc;
                    maxv[j] = sc > maxv[j] ? sc : maxv[j];
                }
            }
        }
    }
    float inv_sum[MAX_HEADS];
    for (int j = 0; j < nq; j++) {
        inv_sum[j] = 1.f / exp_shift_sum_avx512(scores + (int64_t)j * seq_len, seq_len, maxv[j]);
        for (int c = 0; c < chunks16; c++) acc[j * chunks16 + c] = _mm512_setzero_ps();
    }
    for (int p0 = 0, b = 0; p0 < seq_len; p0 += block_size, b++) {
        const int n = seq_len - p0 < block_size ? seq_len - p0 : block_size;
        const uint16_t *blk = cache + (int64_t)blocks[b] * 2 * half_stride + half_stride;
        for (int i = 0; i < n; i++) {
            for (int h = h_lo; h < h_hi; h++) {
                const uint16_t *v = blk + i * row_stride + (int64_t)h * D;
                __m512 vc[MAX_HEAD_DIM / 16];
                for (int c = 0; c < chunks16; c++)
                    vc[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256((const __m256i *)(v + 16 * c))), 16));
                for (int g = 0; g < G; g++) {
                    const int j = (h - h_lo) * G + g;
                    const __m512 w = _mm512_set1_ps(scores[(int64_t)j * seq_len + p0 + i]);
                    __m512 *aj = acc + j * chunks16;
                    for (int c = 0; c < chunks16; c++) aj[c] = _mm512_fmadd_ps(w, vc[c], aj[c]);
                }
            }
        }
    }
    for (int j = 0; j < nq; j++) {
        float tmp[MAX_HEAD_DIM];
        const __m512 inv = _mm512_set1_ps(inv_sum[j]);
        for (int c = 0; c < chunks16; c++)
            _mm512_storeu_ps(tmp + 16 * c, _mm512_mul_ps(acc[j * chunks16 + c], inv));
        uint16_t *dst = (uint16_t *)out + seq_q_row + ((int64_t)h_lo * G + j) * D;
        for (int d = 0; d < D; d++) dst[d] = float_to_bf16(tmp[d]);
    }
}
#endif

/* One (sequence, kv head) pair: G query heads attend over seq_len cached positions. */
static void attend_one(const void *q, const void *cache, const int32_t *blocks, int seq_len,
                       void *out, int64_t q_row, int G, int num_kv_heads, int D, int block_size,
                       int kv_head, float scale, int is_bf16, float *restrict scores) {
    const int64_t row_stride = (int64_t)num_kv_heads * D;       /* next position in a block */
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
    /* Pass 1: scores q.k for every cached position, a block at a time. */
    for (int p0 = 0, b = 0; p0 < seq_len; p0 += block_size, b++) {
        const int n = seq_len - p0 < block_size ? seq_len - p0 : block_size;
        widen_rows(cache, (int64_t)blocks[b] * 2 * half_stride + (int64_t)kv_head * D, row_stride,
                   n, D, is_bf16, tile);
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
    for (int p0 = 0, b = 0; p0 < seq_len; p0 += block_size, b++) {
        const int n = seq_len - p0 < block_size ? seq_len - p0 : block_size;
        widen_rows(cache, (int64_t)blocks[b] * 2 * half_stride + half_stride + (int64_t)kv_head * D,
                   row_stride, n, D, is_bf16, tile);
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

/* q, out: [num_seqs, num_q_heads, head_dim] contiguous; block_table: [num_seqs, bt_stride] int32.
 * Returns 0, or -1 when the shape is outside the kernel's limits (the caller falls back). */
int fornax_paged_decode(const void *q, const void *cache, const int32_t *block_table,
                        int64_t bt_stride, const int32_t *seq_lens, void *out, int num_seqs,
                        int num_q_heads, int num_kv_heads, int head_dim, int block_size,
                        float scale, int is_bf16, int num_threads) {
    if (head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK || num_q_heads % num_kv_heads != 0 ||
        num_q_heads / num_kv_heads > MAX_GROUP)
        return -1;
    const int G = num_q_heads / num_kv_heads;
    int max_len = 1;
    for (int s = 0; s < num_seqs; s++)
        if (seq_lens[s] > max_len) max_len = seq_lens[s];
    /* Enough sequences to keep every thread busy: one item per sequence (all its heads, so each
     * block streams contiguously); otherwise one item per (sequence, kv head). */
    const int heads_per_item = num_seqs >= 2 * num_threads ? num_kv_heads : 1;
    const int items = num_seqs * (num_kv_heads / heads_per_item);
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = (float *)malloc((size_t)num_q_heads * max_len * sizeof(float));
#ifdef HAVE_BF16_FAST_PATH
        __m512 *acc = (__m512 *)_mm_malloc((size_t)num_q_heads * (MAX_HEAD_DIM / 16) *
                                           sizeof(__m512), 64);
#else
        void *acc = scores;
#endif
        if (!scores || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < items; it++) {
            if (!scores || !acc) continue;
            const int per_seq = num_kv_heads / heads_per_item;
            const int s = it / per_seq, h_lo = (it % per_seq) * heads_per_item;
            const int h_hi = h_lo + heads_per_item;
            const int32_t *blocks = block_table + (int64_t)s * bt_stride;
            const int64_t seq_q_row = (int64_t)s * num_q_heads * head_dim;
#ifdef HAVE_BF16_FAST_PATH
            if (is_bf16 && head_dim % 32 == 0 && num_q_heads <= MAX_HEADS) {
                attend_seq_bf16((const uint16_t *)q, (const uint16_t *)cache, blocks, seq_lens[s],
                                (uint16_t *)out, seq_q_row, G, num_kv_heads, head_dim, block_size,
                                h_lo, h_hi, scale, scores, acc);
                continue;
            }
#endif
            for (int h = h_lo; h < h_hi; h++)
                attend_one(q, cache, blocks, seq_lens[s], out, seq_q_row + (int64_t)h * G * head_dim,
                           G, num_kv_heads, head_dim, block_size, h, scale, is_bf16, scores);
        }
        free(scores);
#ifdef HAVE_BF16_FAST_PATH
        _mm_free(acc);
#endif
    }
    return failed ? -1 : 0;
}
