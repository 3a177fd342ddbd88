/* Weight-only quantized linear layers on CPU: out = x @ W^T (+ bias) with W in the q4/q8 layouts
 * of runtime/kernels/quant_format.py, float16 scales (and q4 mins) per group of 32 or 16.
 *
 * The linear kernel reads the "panel16" layout: 16 output rows per panel, each 64-byte vector
 * holding one 4-byte word of every row of the panel (word w of a row: q4 elements 4v..4v+3 of
 * group w / 4 in the low nibbles and 16+4v.. in the high ones, v = w % 4; q8 elements 4w..4w+3,
 * stored +128 as u8), scales and mins [panel][group][16]. So one vector lane accumulates one
 * output row: no horizontal sums, one vector of 16 outputs stored per panel and activation row.
 *
 * Each activation row is first quantized to int8 per weight group (symmetric, d = amax / 127,
 * q = round-to-nearest-even(x / d)), so a group's dot product is one integer sum: AVX512-VNNI
 * vpdpbusd multiplies the u8 weights with 4 int8 activations broadcast to every lane; the q8
 * +128 comes back out by starting the sum at -128 * (sum of the group's int8 activations). The
 * q4 min term uses the float sum of each activation group, exactly. The only error against
 * F.linear(x, dequantize(W)) is the activation rounding: at most amax_group / 254 per element,
 * i.e. |error| <= sum over groups of (amax_group / 254) * sum |w| over the group.
 *
 * Paths: AVX512-VNNI (fornax_quant_linear_isa() == 2) and plain C (0) over the same quantized
 * activations, so both give the same integer sums; the caller may ask for the plain C path.
 * Built by runtime/kernels/build.py.
 */
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

int fornax_quant_linear_isa(void) { return HAVE_VNNI ? ISA_VNNI : ISA_C; }

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
    int64_t xstride;
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
        const int64_t at = (int64_t)m * p->n + r0 + i;
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
            const int64_t at = (int64_t)(m0 + j) * p->n + r0;
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

/* out[m, row] = x[m] . W[row] (+ bias[row]) for m < m_rows, row < n.
 * desc: the weight as 8 int64 (quant_linear.py builds it once per weight): data, scales and
 * mins addresses (mins 0 for q8), q4 (1) or q8 (0), group, n, k, layout (1: panel16, the only
 * one this function reads). x: m_rows rows of k values x_stride elements apart; out: m_rows
 * rows of n values, contiguous, both float32 or both bf16 (flags bit 0); bias: NULL, float32 or
 * bf16 (flags bit 1). flags >> 2: ISA_VNNI, or ISA_C for the plain C path (also on a VNNI
 * machine). Returns 0, or -1 for a shape the kernel does not take, -2 when out of memory, -3
 * for a weight not in the panel layout. */
int fornax_quant_linear(const int64_t *desc, const void *x, int64_t x_stride, int m_rows,
                        const void *bias, void *out, int flags, int num_threads) {
    const int q4 = (int)desc[3], group = (int)desc[4], n = (int)desc[5], k = (int)desc[6];
    const int x_bf16 = flags & 1, isa = flags >> 2;
    if (m_rows <= 0 || n <= 0 || k <= 0 || (group != 16 && group != 32) || (q4 && group != 32) ||
        k % group)
        return -1;
    if (desc[7] != LAYOUT_PANEL) return -3;
    Problem p = {0};
    p.q4 = q4, p.group = group, p.n = n, p.k = k, p.m = m_rows, p.groups = k / group;
    p.wpg = q4 ? 4 : group / 4, p.words = q4 ? k / 8 : k / 4;
    p.w = (const uint8_t *)(intptr_t)desc[0];
    p.scales = (const uint16_t *)(intptr_t)desc[1];
    p.mins = (const uint16_t *)(intptr_t)desc[2];
    p.out = out, p.bias = bias, p.out_bf16 = x_bf16, p.bias_bf16 = (flags >> 1) & 1;
    p.xstride = ((int64_t)k + 63) & ~(int64_t)63;
    const size_t qbytes = (size_t)m_rows * (size_t)p.xstride;
    const size_t per = (size_t)m_rows * p.groups * 4;
    uint8_t *buf = scratch_get(0, qbytes + 3 * per);
    if (buf == NULL) return -2;
    p.xq = (int8_t *)buf;
    p.xs = (float *)(buf + qbytes);
    p.xsum = (float *)(buf + qbytes + per);
    p.xbias = (int32_t *)(buf + qbytes + 2 * per);
    const int use_vnni = HAVE_VNNI && isa == ISA_VNNI;
    const int panels = (n + PANEL - 1) / PANEL, blocks = (panels + 1) / 2;
    const int serial = (int64_t)m_rows * k <= 16384; /* a few rows: no barrier for them */
    if (serial)
        for (int m = 0; m < m_rows; m++)
            quantize_row(&p, x, x_bf16, (int64_t)m * x_stride, m, use_vnni);
#pragma omp parallel num_threads(num_threads) if ((int64_t)m_rows * n * k > 200000)
    {
        if (!serial) {
#pragma omp for schedule(static)
            for (int m = 0; m < m_rows; m++)
                quantize_row(&p, x, x_bf16, (int64_t)m * x_stride, m, use_vnni);
        }
#pragma omp for schedule(static)
        for (int blk = 0; blk < blocks; blk++) {
            const int pn = 2 * blk, pb = panels - pn < 2 ? 1 : 2;
            for (int m0 = 0; m0 < m_rows; m0 += MAX_MT) {
                const int mt = m_rows - m0 < MAX_MT ? m_rows - m0 : MAX_MT;
#if HAVE_VNNI
                if (use_vnni) {
                    if (pb == 2 && mt <= 2) {
                        panels_vnni(&p, pn, m0, mt, 2);
                    } else {
                        for (int b = 0; b < pb; b++) panels_vnni(&p, pn + b, m0, mt, 1);
                    }
                    continue;
                }
#endif
                for (int b = 0; b < pb; b++) panel_c(&p, pn + b, m0, mt);
            }
        }
    }
    (void)use_vnni;
    return 0;
}

/* Row r of a weight in either layout as row-major q4/q8 bytes, scales and mins (for a panel
 * weight, gathered into tmp: wbytes + 4 * groups bytes). */
static void fetch_row(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, int q4,
                      int layout, int groups, int wbytes, int64_t r, uint8_t *tmp,
                      const uint8_t **wr, const uint16_t **sc, const uint16_t **mn) {
    if (layout != LAYOUT_PANEL) {
        *wr = w + r * wbytes;
        *sc = scales + r * groups;
        *mn = q4 ? mins + r * groups : NULL;
        return;
    }
    const int words = wbytes / 4;
    const uint8_t *base = w + (r / PANEL) * words * 64 + (r % PANEL) * 4;
    for (int i = 0; i < words; i++) {
        uint32_t v;
        memcpy(&v, base + (int64_t)i * 64, 4);
        if (!q4) v ^= 0x80808080u; /* q8 panels hold q + 128 */
        memcpy(tmp + 4 * i, &v, 4);
    }
    uint16_t *s = (uint16_t *)(tmp + wbytes), *m = s + groups;
    const int64_t at = (r / PANEL) * groups * PANEL + r % PANEL;
    for (int g = 0; g < groups; g++) {
        s[g] = scales[at + g * PANEL];
        if (q4) m[g] = mins[at + g * PANEL];
    }
    *wr = tmp, *sc = s, *mn = q4 ? m : NULL;
}

static void store(void *out, int out_bf16, int64_t i, float v) {
    if (out_bf16)
        ((uint16_t *)out)[i] = float_to_bf16(v);
    else
        ((float *)out)[i] = v;
}

/* One dense row: q * scale (+ min), rounded as torch rounds (a float32 product, then the sum). */
static void dequantize_row(const uint8_t *wr, const uint16_t *sc, const uint16_t *mn, int q4,
                           int group, int groups, void *out, int out_bf16, int vec) {
#if HAVE_VNNI
    if (vec) {
        const __m128i nib = _mm_set1_epi8(0x0f);
        for (int g = 0; g < groups; g++) {
            const __m512 s = _mm512_set1_ps(_cvtsh_ss(sc[g]));
            __m512 v[2];
            if (q4) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(wr + g * 16));
                const __m512 m = _mm512_set1_ps(_cvtsh_ss(mn[g]));
                const __m128i lo = _mm_and_si128(b, nib);
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
                v[0] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s),
                                     m);
                v[1] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s),
                                     m);
            } else {
                for (int h = 0; h < group / 16; h++) {
                    const __m128i b = _mm_loadu_si128((const __m128i *)(wr + g * group + h * 16));
                    v[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s);
                }
            }
            for (int h = 0; h < group / 16; h++) {
                const int64_t at = (int64_t)g * group + h * 16;
                if (out_bf16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), bf16x16_round(v[h]));
                else
                    _mm512_storeu_ps((float *)out + at, v[h]);
            }
        }
        return;
    }
#endif
    (void)vec;
    for (int g = 0; g < groups; g++) {
        const float s = half_to_float(sc[g]);
        for (int e = 0; e < group; e++) {
            const int64_t at = (int64_t)g * group + e;
            if (q4) {
                const int q = e < 16 ? wr[g * 16 + e] & 15 : wr[g * 16 + e - 16] >> 4;
                store(out, out_bf16, at, (float)q * s + half_to_float(mn[g]));
            } else {
                store(out, out_bf16, at, (float)(int8_t)wr[g * group + e] * s);
            }
        }
    }
}

/* Rows row_ids (NULL: rows row0, row0 + 1, ...) of a q4/q8 weight in either layout (layout 1:
 * panel16), dense, as float32 or bf16 (out_bf16), row-major [rows, k]: the same values as
 * quant_format.dequantize, for embeddings and large batches. Returns -2 when out of memory. */
int fornax_quant_dequantize(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, int q4,
                            int group, int k, int layout, const int64_t *row_ids, int64_t row0,
                            int rows, void *out, int out_bf16, int num_threads) {
    const int groups = k / group, wbytes = q4 ? k / 2 : k, size = out_bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * k > 262144) schedule(static)
    for (int i = 0; i < rows; i++) {
        uint8_t *tmp = NULL;
        if (layout == LAYOUT_PANEL && (tmp = scratch_get(1, (size_t)wbytes + 4 * groups)) == NULL) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        const int64_t r = row_ids != NULL ? row_ids[i] : row0 + i;
        const uint8_t *wr;
        const uint16_t *sc, *mn;
        fetch_row(w, scales, mins, q4, layout, groups, wbytes, r, tmp, &wr, &sc, &mn);
        dequantize_row(wr, sc, mn, q4, group, groups, (uint8_t *)out + (int64_t)i * k * size,
                       out_bf16, HAVE_VNNI);
    }
    return failed ? -2 : 0;
}

#if HAVE_VNNI
/* Two bytes of each lane of v (bits sh .. sh + 15; q8: signed) as q * s (+ m) rounded to bf16,
 * stored as one 64-byte tile row: lane r = the pair of elements of output row r. */
INLINE void amx_pair_row(uint16_t *dst, __m512i v, int sh, int q4, __m512 s, __m512 m) {
    __m512 f[2];
    for (int b = 0; b < 2; b++) {
        const int at = sh + 8 * b;
        const __m512i q = q4 ? _mm512_and_si512(_mm512_srli_epi32(v, at), _mm512_set1_epi32(0xff))
                             : _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - at), 24);
        f[b] = _mm512_mul_ps(_mm512_cvtepi32_ps(q), s);
        if (q4) f[b] = _mm512_add_ps(f[b], m);
    }
#if defined(__AVX512BF16__) /* the same rounding: no value here is NaN or below 2**-126 */
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]);
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(idx, pairs));
#else
    const __m512i lo = _mm512_srli_epi32(bf16x16_round_bits(f[0]), 16);
    const __m512i hi =
        _mm512_and_si512(bf16x16_round_bits(f[1]), _mm512_set1_epi32((int)0xffff0000u));
    _mm512_storeu_si512(dst, _mm512_or_si512(lo, hi));
#endif
}

/* One 16-column B tile of amx_linear_cpu.c's layout ([k pair 16][column 16][k % 2] bf16) from
 * k-block kb (32 inputs) of panel wd / sc / mn. */
static void amx_tile(const Problem *p, const uint8_t *wd, const uint16_t *sc, const uint16_t *mn,
                     int kb, uint16_t *tile) {
    if (p->q4) {
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + kb * 16)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mn + kb * 16)));
        const __m512i nib = _mm512_set1_epi8(0x0f);
        for (int v = 0; v < 4; v++) {
            const __m512i wv = _mm512_loadu_si512(wd + (int64_t)(kb * 4 + v) * 64);
            const __m512i lo = _mm512_and_si512(wv, nib);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib);
            amx_pair_row(tile + (2 * v) * 32, lo, 0, 1, s, m);
            amx_pair_row(tile + (2 * v + 1) * 32, lo, 16, 1, s, m);
            amx_pair_row(tile + (8 + 2 * v) * 32, hi, 0, 1, s, m);
            amx_pair_row(tile + (9 + 2 * v) * 32, hi, 16, 1, s, m);
        }
        return;
    }
    for (int w = 0; w < 8; w++) {
        const int g = (kb * 32 + 4 * w) / p->group;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + g * 16)));
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wd + (int64_t)(kb * 8 + w) * 64),
                                            _mm512_set1_epi8((char)0x80));
        amx_pair_row(tile + (2 * w) * 32, wv, 0, 0, s, s);
        amx_pair_row(tile + (2 * w + 1) * 32, wv, 16, 0, s, s);
    }
}
#endif

/* Panels [panel0, panel0 + panels) (panel0 even) of a panel16 weight dequantized to bf16 in
 * amx_linear_cpu.c's packed layout: unit u = panels panel0 + 2u and + 2u + 1 (zeros past the
 * last), each [k block of 32][half][k pair][column][k % 2], for its AMX tile kernel (prefill-sized
 * batches on CPUs with AMX). The values are quant_format.dequantize's, rounded to bf16. Returns
 * -1 without AVX-512 (no AMX either) or for an odd panel0 or another layout. */
int fornax_quant_to_amx(const int64_t *desc, int panel0, int panels, uint16_t *out,
                        int num_threads) {
#if HAVE_VNNI
    Problem p = {0};
    p.q4 = (int)desc[3], p.group = (int)desc[4], p.n = (int)desc[5], p.k = (int)desc[6];
    if (desc[7] != LAYOUT_PANEL || panel0 % 2 || p.k % 32 || panels <= 0) return -1;
    p.groups = p.k / p.group, p.words = p.q4 ? p.k / 8 : p.k / 4;
    p.w = (const uint8_t *)(intptr_t)desc[0];
    p.scales = (const uint16_t *)(intptr_t)desc[1];
    p.mins = (const uint16_t *)(intptr_t)desc[2];
    const int kbs = p.k / 32, slots = panels + (panels & 1);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int i = 0; i < slots; i++) {
        uint16_t *unit = out + (int64_t)(i / 2) * kbs * 1024 + (i & 1) * 512;
        const int64_t pn = panel0 + i;
        const uint8_t *wd = p.w + pn * p.words * 64;
        const uint16_t *sc = p.scales + pn * p.groups * PANEL;
        const uint16_t *mn = p.q4 ? p.mins + pn * p.groups * PANEL : NULL;
        for (int kb = 0; kb < kbs; kb++) {
            if (i >= panels)
                memset(unit + (int64_t)kb * 1024, 0, 1024);
            else
                amx_tile(&p, wd, sc, mn, kb, unit + (int64_t)kb * 1024);
        }
    }
    return 0;
#else
    (void)desc, (void)panel0, (void)panels, (void)out, (void)num_threads;
    return -1;
#endif
}
