/* The weight-only quantized matmul core shared by quant_linear_cpu.c and decode_layers_cpu.c
 * (included, not built on its own): the panel16 problem, activation quantization and the
 * per-panel loops (AVX512-VNNI and plain C); quant_linear_cpu.c describes the layout and error.
 */
#ifndef FORNAX_QUANT_MATMUL_H
#define FORNAX_QUANT_MATMUL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define PANEL 16 /* output rows per panel (one per 32-bit vector lane) */
#define MAX_MT 4 /* activation rows per tile (reuse of one weight load) */
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead in the weight stream (0: none) */
#endif
#define ISA_C 0
#define ISA_VNNI 2
#define LAYOUT_PANEL 1

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union {
        uint32_t u;
        float f;
    } c;
    if (exp == 0) {
        c.f = ldexpf((float)man, -24);
        c.u |= sign;
    } else if (exp == 31) {
        c.u = sign | 0x7f800000u | (man << 13);
    } else {
        c.u = sign | ((exp + 112) << 23) | (man << 13);
    }
    return c.f;
}

/* The problem: a panel16 weight and the quantized activations. Activation row m: xq int8 in the
 * natural order (xstride bytes apart), per group xs (amax / 127), xsum (float sum, q4) and xbias
 * (-128 * sum of the int8 values, q8), `groups` apart. */
typedef struct {
    int q4, group, n, k, m, groups, wpg, words;
    const uint8_t *w;
    const uint16_t *scales, *mins;
    int8_t *xq;
    float *xs, *xsum;
    int32_t *xbias;
    int64_t xstride, ostride; /* ostride: elements between output rows (n unless set) */
    void *out;
    const void *bias;
    int out_bf16, bias_bf16;
} Problem;

static float load_x(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* One activation group of n values (16 or 32) starting at element off: its int8 values
 * qb = round-half-even(v * 127 / amax), amax and the float sum. */
static void quantize_group(const void *x, int bf16, int64_t off, int n, int vec, int8_t *qb,
                           float *amax, float *sum) {
#if HAVE_VNNI
    if (vec) {
        const uint16_t *xh = (const uint16_t *)x + off;
        const float *xf = (const float *)x + off;
        const __m512 v0 =
            bf16 ? bf16x16_to_float(_mm256_loadu_si256((const __m256i *)xh)) : _mm512_loadu_ps(xf);
        const __m512 v1 = n < 32 ? _mm512_setzero_ps()
                          : bf16 ? bf16x16_to_float(_mm256_loadu_si256((const __m256i *)(xh + 16)))
                                 : _mm512_loadu_ps(xf + 16);
        const float am = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const __m512 inv = _mm512_set1_ps(am > 0.f ? 127.f / am : 0.f);
        _mm_storeu_si128((__m128i *)qb,
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv))));
        if (n == 32)
            _mm_storeu_si128((__m128i *)(qb + 16),
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv))));
        *amax = am;
        *sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        return;
    }
#endif
    (void)vec;
    float v[32], am = 0.f, total = 0.f;
    for (int e = 0; e < n; e++) {
        v[e] = load_x(x, bf16, off + e);
        const float a = fabsf(v[e]);
        am = a > am ? a : am;
        total += v[e];
    }
    const float inv = am > 0.f ? 127.f / am : 0.f;
    for (int e = 0; e < n; e++) qb[e] = (int8_t)(int)rintf(v[e] * inv);
    *amax = am;
    *sum = total;
}

/* Activation row m (elements off.. of x) into p's buffers. */
static void quantize_row(const Problem *p, const void *x, int bf16, int64_t off, int m, int vec) {
    int8_t *q = p->xq + (int64_t)m * p->xstride;
    const int64_t at = (int64_t)m * p->groups;
    for (int g = 0; g < p->groups; g++) {
        int8_t *qb = q + (int64_t)g * p->group;
        float amax;
        quantize_group(x, bf16, off + (int64_t)g * p->group, p->group, vec, qb, &amax,
                       p->xsum + at + g);
        p->xs[at + g] = amax / 127.f;
        int32_t total = 0;
        for (int e = 0; e < p->group; e++) total += qb[e];
        p->xbias[at + g] = -128 * total;
    }
}

/* Lanes [0, cols) of the 16 results v of activation row m, panel pn: + bias, stored. */
static void store_panel(const Problem *p, int pn, int m, const float *v) {
    const int r0 = pn * PANEL, cols = p->n - r0 < PANEL ? p->n - r0 : PANEL;
    for (int i = 0; i < cols; i++) {
        float b = 0.f;
        if (p->bias != NULL)
            b = p->bias_bf16 ? bf16_to_float(((const uint16_t *)p->bias)[r0 + i])
                             : ((const float *)p->bias)[r0 + i];
        const int64_t at = (int64_t)m * p->ostride + r0 + i;
        if (p->out_bf16)
            ((uint16_t *)p->out)[at] = float_to_bf16(v[i] + b);
        else
            ((float *)p->out)[at] = v[i] + b;
    }
}

/* Plain C: panel pn against activation rows m0 .. m0 + mt - 1. */
static void panel_c(const Problem *p, int pn, int m0, int mt) {
    const uint8_t *wd = p->w + (int64_t)pn * p->words * 64;
    const uint16_t *sc = p->scales + (int64_t)pn * p->groups * PANEL;
    const uint16_t *mn = p->q4 ? p->mins + (int64_t)pn * p->groups * PANEL : NULL;
    for (int j = 0; j < mt; j++) {
        const int64_t xa = (int64_t)(m0 + j) * p->groups;
        const int8_t *xq = p->xq + (int64_t)(m0 + j) * p->xstride;
        float acc[PANEL] = {0};
        for (int g = 0; g < p->groups; g++) {
            int32_t isum[PANEL];
            for (int r = 0; r < PANEL; r++) isum[r] = p->q4 ? 0 : p->xbias[xa + g];
            for (int v = 0; v < p->wpg; v++) {
                const uint8_t *wb = wd + (int64_t)(g * p->wpg + v) * 64;
                const int8_t *a = xq + g * p->group + 4 * v;
                for (int r = 0; r < PANEL; r++)
                    for (int b = 0; b < 4; b++) {
                        const int byte = wb[r * 4 + b];
                        isum[r] +=
                            p->q4 ? (byte & 15) * a[b] + (byte >> 4) * a[16 + b] : byte * a[b];
                    }
            }
            for (int r = 0; r < PANEL; r++) {
                const float s = half_to_float(sc[g * PANEL + r]) * p->xs[xa + g];
                acc[r] += (float)isum[r] * s;
                if (p->q4) acc[r] += half_to_float(mn[g * PANEL + r]) * p->xsum[xa + g];
            }
        }
        store_panel(p, pn, m0 + j, acc);
    }
}

#if HAVE_VNNI
#define INLINE static inline __attribute__((always_inline))

INLINE __m512i bcast4(const int8_t *a) {
    int32_t v;
    memcpy(&v, a, 4);
    return _mm512_set1_epi32(v);
}

/* Panels pn .. pn + pb - 1 against activation rows m0 .. m0 + mt - 1; q4 and wpg (4-byte words
 * per group and row) are constants of each instance. */
INLINE void panel_vnni(const Problem *p, int pn, int m0, const int mt, const int pb, const int q4,
                       const int wpg) {
    const int group = q4 ? 32 : wpg * 4;
    const uint8_t *wd[2];
    const uint16_t *sc[2], *mn[2];
    const int8_t *xq[MAX_MT];
    __m512 acc[2][MAX_MT];
#pragma GCC unroll 2
    for (int b = 0; b < pb; b++) {
        wd[b] = p->w + (int64_t)(pn + b) * p->words * 64;
        sc[b] = p->scales + (int64_t)(pn + b) * p->groups * PANEL;
        mn[b] = q4 ? p->mins + (int64_t)(pn + b) * p->groups * PANEL : NULL;
#pragma GCC unroll 4
        for (int j = 0; j < mt; j++) acc[b][j] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int j = 0; j < mt; j++) xq[j] = p->xq + (int64_t)(m0 + j) * p->xstride;
    const __m512i nib = _mm512_set1_epi8(0x0f);
    for (int g = 0; g < p->groups; g++) {
        __m512i s0[2][MAX_MT], s1[2][MAX_MT];
#pragma GCC unroll 2
        for (int b = 0; b < pb; b++)
#pragma GCC unroll 4
            for (int j = 0; j < mt; j++) {
                s0[b][j] = q4 ? _mm512_setzero_si512()
                              : _mm512_set1_epi32(p->xbias[(int64_t)(m0 + j) * p->groups + g]);
                s1[b][j] = _mm512_setzero_si512();
            }
#pragma GCC unroll 2
        for (int b = 0; b < pb * (PREFETCH > 0); b++)
#pragma GCC unroll 8
            for (int v = 0; v < wpg; v++)
                _mm_prefetch((const char *)(wd[b] + (int64_t)(g * wpg + v) * 64 + PREFETCH),
                             _MM_HINT_T0);
#pragma GCC unroll 8
        for (int v = 0; v < wpg; v++) {
#pragma GCC unroll 2
            for (int b = 0; b < pb; b++) {
                const __m512i wv = _mm512_loadu_si512(wd[b] + (int64_t)(g * wpg + v) * 64);
                if (q4) {
                    const __m512i lo = _mm512_and_si512(wv, nib);
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib);
#pragma GCC unroll 4
                    for (int j = 0; j < mt; j++) {
                        const int8_t *a = xq[j] + g * 32 + 4 * v;
                        s0[b][j] = _mm512_dpbusd_epi32(s0[b][j], lo, bcast4(a));
                        s1[b][j] = _mm512_dpbusd_epi32(s1[b][j], hi, bcast4(a + 16));
                    }
                } else {
#pragma GCC unroll 4
                    for (int j = 0; j < mt; j++) {
                        const __m512i a = bcast4(xq[j] + g * group + 4 * v);
                        if (v & 1)
                            s1[b][j] = _mm512_dpbusd_epi32(s1[b][j], wv, a);
                        else
                            s0[b][j] = _mm512_dpbusd_epi32(s0[b][j], wv, a);
                    }
                }
            }
        }
#pragma GCC unroll 2
        for (int b = 0; b < pb; b++) {
            const __m512 ws =
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc[b] + g * 16)));
            const __m512 wm =
                q4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mn[b] + g * 16)))
                   : _mm512_setzero_ps();
#pragma GCC unroll 4
            for (int j = 0; j < mt; j++) {
                const int64_t xa = (int64_t)(m0 + j) * p->groups + g;
                const __m512 t = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[b][j], s1[b][j]));
                acc[b][j] =
                    _mm512_fmadd_ps(t, _mm512_mul_ps(ws, _mm512_set1_ps(p->xs[xa])), acc[b][j]);
                if (q4) acc[b][j] = _mm512_fmadd_ps(wm, _mm512_set1_ps(p->xsum[xa]), acc[b][j]);
            }
        }
    }
#pragma GCC unroll 2
    for (int b = 0; b < pb; b++) {
        const int r0 = (pn + b) * PANEL;
        const __mmask16 k = tail_mask16(p->n - r0);
        __m512 bv = _mm512_setzero_ps();
        if (p->bias != NULL)
            bv = p->bias_bf16 ? bf16x16_load((const uint16_t *)p->bias + r0, k)
                              : _mm512_maskz_loadu_ps(k, (const float *)p->bias + r0);
#pragma GCC unroll 4
        for (int j = 0; j < mt; j++) {
            const __m512 v = _mm512_add_ps(acc[b][j], bv);
            const int64_t at = (int64_t)(m0 + j) * p->ostride + r0;
            if (p->out_bf16)
                bf16x16_store((uint16_t *)p->out + at, v, k);
            else
                _mm512_mask_storeu_ps((float *)p->out + at, k, v);
        }
    }
}

/* Two panels for one or two activation rows (the decode shapes), else one panel, 1-4 rows. */
#define PANEL_CASES(q4, wpg)                                                                       \
    if (pb == 2)                                                                                   \
        mt == 1 ? panel_vnni(p, pn, m0, 1, 2, q4, wpg) : panel_vnni(p, pn, m0, 2, 2, q4, wpg);     \
    else if (mt <= 2)                                                                              \
        mt == 1 ? panel_vnni(p, pn, m0, 1, 1, q4, wpg) : panel_vnni(p, pn, m0, 2, 1, q4, wpg);     \
    else                                                                                           \
        mt == 3 ? panel_vnni(p, pn, m0, 3, 1, q4, wpg) : panel_vnni(p, pn, m0, 4, 1, q4, wpg);

static void panels_vnni(const Problem *p, int pn, int m0, int mt, int pb) {
    if (p->q4) {
        PANEL_CASES(1, 4)
    } else if (p->wpg == 4) {
        PANEL_CASES(0, 4)
    } else {
        PANEL_CASES(0, 8)
    }
}
#endif

/* Grow-only buffers per thread (slot 0: activations of a call, 1: a row being dequantized): no
 * allocation per call once warm. */
static _Thread_local void *scratch[2];
static _Thread_local size_t scratch_size[2];

static void *scratch_get(int slot, size_t bytes) {
    if (bytes > scratch_size[slot]) {
        free(scratch[slot]);
        scratch_size[slot] = (bytes + 4095) & ~(size_t)4095;
        scratch[slot] = aligned_alloc(64, scratch_size[slot]);
        if (scratch[slot] == NULL) scratch_size[slot] = 0;
    }
    return scratch[slot];
}

/* p for m_rows activation rows against the weight desc (see fornax_quant_linear), writing out
 * (bf16 when out_bf16, else float32) with bias (NULL, bf16 or float32). Returns 0, -1 for a shape
 * the kernel does not take, -3 for a weight not in the panel layout. The activation buffers are
 * set apart by quant_buffers. */
static int quant_problem(Problem *p, const int64_t *desc, int m_rows, void *out, int out_bf16,
                         const void *bias, int bias_bf16) {
    const int q4 = (int)desc[3], group = (int)desc[4], n = (int)desc[5], k = (int)desc[6];
    if (m_rows <= 0 || n <= 0 || k <= 0 || (group != 16 && group != 32) || (q4 && group != 32) ||
        k % group)
        return -1;
    if (desc[7] != LAYOUT_PANEL) return -3;
    memset(p, 0, sizeof(*p));
    p->q4 = q4, p->group = group, p->n = n, p->k = k, p->m = m_rows, p->groups = k / group;
    p->wpg = q4 ? 4 : group / 4, p->words = q4 ? k / 8 : k / 4;
    p->w = (const uint8_t *)(intptr_t)desc[0];
    p->scales = (const uint16_t *)(intptr_t)desc[1];
    p->mins = (const uint16_t *)(intptr_t)desc[2];
    p->out = out, p->bias = bias, p->out_bf16 = out_bf16, p->bias_bf16 = bias_bf16;
    p->xstride = ((int64_t)k + 63) & ~(int64_t)63;
    p->ostride = n;
    return 0;
}

/* Bytes of activation buffers p needs (quant_buffers). */
static size_t quant_buffer_bytes(const Problem *p) {
    return (size_t)p->m * (size_t)p->xstride + 3 * (size_t)p->m * p->groups * 4;
}

/* p's activation buffers carved out of buf (quant_buffer_bytes, 64-byte aligned). */
static void quant_buffers(Problem *p, uint8_t *buf) {
    const size_t qbytes = (size_t)p->m * (size_t)p->xstride, per = (size_t)p->m * p->groups * 4;
    p->xq = (int8_t *)buf;
    p->xs = (float *)(buf + qbytes);
    p->xsum = (float *)(buf + qbytes + per);
    p->xbias = (int32_t *)(buf + qbytes + 2 * per);
}

/* Every panel of p against its quantized activation rows, shared among the threads of the
 * enclosing OpenMP parallel region (an orphaned `omp for`: serial outside one); ends with the
 * loop's barrier. */
static void quant_panels(const Problem *p, int use_vnni) {
    const int panels = (p->n + PANEL - 1) / PANEL, blocks = (panels + 1) / 2;
#pragma omp for schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        const int pn = 2 * blk, pb = panels - pn < 2 ? 1 : 2;
        for (int m0 = 0; m0 < p->m; m0 += MAX_MT) {
            const int mt = p->m - m0 < MAX_MT ? p->m - m0 : MAX_MT;
#if HAVE_VNNI
            if (use_vnni) {
                if (pb == 2 && mt <= 2) {
                    panels_vnni(p, pn, m0, mt, 2);
                } else {
                    for (int b = 0; b < pb; b++) panels_vnni(p, pn + b, m0, mt, 1);
                }
                continue;
            }
#endif
            for (int b = 0; b < pb; b++) panel_c(p, pn + b, m0, mt);
        }
    }
    (void)use_vnni;
}
#endif
