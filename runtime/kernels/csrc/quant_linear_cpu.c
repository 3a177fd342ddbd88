/* Weight-only quantized linear layers on CPU: out = x @ W^T (+ bias) with W in the q4/q8 layout
 * of runtime/kernels/quant_format.py (row-major per output row, float16 scales per group).
 *
 * Each activation row is first quantized to int8 per weight group (symmetric, d = amax / 127,
 * q = round-to-nearest-even(x / d)), so a group's dot product is one integer sum: AVX512-VNNI
 * vpdpbusd multiplies the 4-bit weights (u8) with the int8 activations; q8 weights (s8) meet the
 * activations shifted by +128 (u8) and lose the shift with a second vpdpbusd against a vector of
 * 128s. The q4 min term uses the float sum of each activation group, exactly. The only error
 * against F.linear(x, dequantize(W)) is the activation rounding: at most amax_group / 254 per
 * element, i.e. |error| <= sum over groups of (amax_group / 254) * sum |w| over the group.
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

#define ROWS 4  /* output rows per pass (weight streams read together) */
#define ACTS 4  /* activation rows per pass (reuse of one weight load) */
#define UNIT 64 /* weight bytes per vector: 128 q4 elements or 64 q8 elements */
#define ISA_C 0
#define ISA_VNNI 2

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

/* The problem and its quantized activations. Activation row m holds `abytes` bytes: for q4,
 * per unit of 128 elements, the low-nibble partners (element j < 16 of each of its 4 groups)
 * then the high-nibble ones; for q8, the natural order as u8 (q + 128). xsx holds 16 floats per
 * unit, the activation scale of the group each int32 lane of a vpdpbusd result sums. */
typedef struct {
    int q4, group, n, k, m, groups, units, lanes_per_group;
    const uint8_t *w;
    const uint16_t *scales, *mins;
    uint8_t *xq;
    float *xsx, *xsum;
    int64_t abytes;
} Problem;

static int64_t act_pos(const Problem *p, int g, int e) {
    if (!p->q4) return (int64_t)g * p->group + e;
    return (int64_t)(g / 4) * 128 + (e >= 16 ? 64 : 0) + (g % 4) * 16 + (e & 15);
}

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

/* Activation row m into the kernel's order (see Problem), with its scales and group sums. */
static void quantize_row(const Problem *p, const void *x, int bf16, int64_t off, int m, int vec) {
    uint8_t *q = p->xq + (int64_t)m * p->abytes;
    float *xsx = p->xsx + (int64_t)m * p->units * 16, *xsum = p->xsum + (int64_t)m * p->groups;
    const int gpu = 16 / p->lanes_per_group, done = p->groups * p->group;
    memset(q + done, p->q4 ? 0 : 128, (size_t)(p->abytes - done)); /* the last unit's padding */
    memset(xsx, 0, (size_t)p->units * 16 * sizeof(float));
    for (int g = 0; g < p->groups; g++) {
        int8_t qb[32];
        float amax;
        quantize_group(x, bf16, off + (int64_t)g * p->group, p->group, vec, qb, &amax, xsum + g);
        if (p->q4) {
            memcpy(q + act_pos(p, g, 0), qb, 16);
            memcpy(q + act_pos(p, g, 16), qb + 16, 16);
        } else {
            for (int e = 0; e < p->group; e++) q[g * p->group + e] = (uint8_t)qb[e] ^ 0x80u;
        }
        const float scale = amax / 127.f;
        for (int l = 0; l < p->lanes_per_group; l++)
            xsx[(g / gpu) * 16 + (g % gpu) * p->lanes_per_group + l] = scale;
    }
}

/* sum over groups of mins[row][g] * xsum[m][g] (the q4 min term). */
static float min_term(const Problem *p, int row, int m) {
    if (!p->q4) return 0.f;
    const uint16_t *mn = p->mins + (int64_t)row * p->groups;
    const float *xs = p->xsum + (int64_t)m * p->groups;
    float acc = 0.f;
    for (int g = 0; g < p->groups; g++) acc += half_to_float(mn[g]) * xs[g];
    return acc;
}

/* Plain C: res[j * ROWS + i] = dot of weight row rows[i] with activation row m0 + j. */
static void tile_c(const Problem *p, const int *rows, int m0, int acts, float *res) {
    const int wbytes = p->q4 ? p->k / 2 : p->k;
    for (int i = 0; i < ROWS; i++) {
        const uint8_t *w = p->w + (int64_t)rows[i] * wbytes;
        const uint16_t *sc = p->scales + (int64_t)rows[i] * p->groups;
        for (int j = 0; j < acts; j++) {
            const uint8_t *q = p->xq + (int64_t)(m0 + j) * p->abytes;
            const float *xsx = p->xsx + (int64_t)(m0 + j) * p->units * 16;
            const int gpu = 16 / p->lanes_per_group;
            float acc = 0.f;
            for (int g = 0; g < p->groups; g++) {
                int32_t isum = 0;
                if (p->q4) {
                    const uint8_t *b = w + g * 16;
                    const int8_t *lo = (const int8_t *)q + act_pos(p, g, 0);
                    const int8_t *hi = (const int8_t *)q + act_pos(p, g, 16);
                    for (int e = 0; e < 16; e++) isum += (b[e] & 15) * lo[e] + (b[e] >> 4) * hi[e];
                } else {
                    const int8_t *b = (const int8_t *)w + g * p->group;
                    const uint8_t *a = q + (int64_t)g * p->group;
                    int32_t wsum = 0; /* (a - 128) * b as one product trips GCC 12's vectorizer */
                    for (int e = 0; e < p->group; e++) {
                        isum += b[e] * a[e];
                        wsum += b[e];
                    }
                    isum -= 128 * wsum;
                }
                const float xs = xsx[(g / gpu) * 16 + (g % gpu) * p->lanes_per_group];
                acc += (float)isum * xs * half_to_float(sc[g]);
            }
            res[j * ROWS + i] = acc + min_term(p, rows[i], m0 + j);
        }
    }
}

#if HAVE_VNNI
#define INLINE static inline __attribute__((always_inline))

/* The float16 scales of one unit's groups, each repeated over the int32 lanes its sum fills. */
INLINE __m512 unit_scales(const uint16_t *sc, __mmask8 sm, const int gpu) {
    const __m512i idx = gpu == 4 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                 : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128 s = _mm_cvtph_ps(_mm_maskz_loadu_epi16(sm, sc));
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s));
}

/* acc[j] += one unit of a weight row (wv, scales ws) against activation rows j < acts. */
INLINE void unit_dot(const int q4, const int acts, __m512i wv, __m512 ws, const uint8_t **qp,
                     const float **xp, int u, __m512 *acc) {
    if (q4) {
        const __m512i nib = _mm512_set1_epi8(0x0f);
        const __m512i lo = _mm512_and_si512(wv, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib);
#pragma GCC unroll 4
        for (int j = 0; j < acts; j++) {
            const uint8_t *q = qp[j] + (int64_t)u * 128;
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(q));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(q + 64));
            const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(xp[j] + u * 16));
            acc[j] = _mm512_fmadd_ps(t, ws, acc[j]);
        }
    } else {
        const __m512i c128 = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
        const __m512i neg = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, wv));
#pragma GCC unroll 4
        for (int j = 0; j < acts; j++) {
            const __m512i s =
                _mm512_dpbusd_epi32(neg, _mm512_loadu_si512(qp[j] + (int64_t)u * 64), wv);
            const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(xp[j] + u * 16));
            acc[j] = _mm512_fmadd_ps(t, ws, acc[j]);
        }
    }
}

/* acc plus the q4 min term's products, 16 groups at a time. */
INLINE __m512 min_term_vnni(const Problem *p, int row, int m, __m512 acc) {
    const uint16_t *mn = p->mins + (int64_t)row * p->groups;
    const float *xs = p->xsum + (int64_t)m * p->groups;
    for (int g = 0; g < p->groups; g += 16) {
        const __mmask16 k = tail_mask16(p->groups - g);
        const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + g));
        acc = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xs + g), acc);
    }
    return acc;
}

/* The lane sums of a, b, c, d. */
INLINE __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    /* per 128-bit lane: ab = [a, b, a, b] partials, cd = [c, d, c, d] */
    const __m512 abcd =
        _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

INLINE void tile_vnni(const Problem *p, const int *rows, int m0, const int acts, const int q4,
                      const int gpu, float *res) {
    const int wbytes = q4 ? p->k / 2 : p->k, full = wbytes / UNIT;
    const __mmask8 all = (__mmask8)((1u << gpu) - 1);
    const uint8_t *wp[ROWS], *qp[ACTS];
    const uint16_t *sp[ROWS];
    const float *xp[ACTS];
    __m512 acc[ROWS][ACTS];
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; i++) {
        wp[i] = p->w + (int64_t)rows[i] * wbytes;
        sp[i] = p->scales + (int64_t)rows[i] * p->groups;
#pragma GCC unroll 4
        for (int j = 0; j < acts; j++) acc[i][j] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int j = 0; j < acts; j++) {
        qp[j] = p->xq + (int64_t)(m0 + j) * p->abytes;
        xp[j] = p->xsx + (int64_t)(m0 + j) * p->units * 16;
    }
    for (int u = 0; u < full; u++) {
#pragma GCC unroll 4
        for (int i = 0; i < ROWS; i++) {
            const __m512i wv = _mm512_loadu_si512(wp[i] + (int64_t)u * UNIT);
            unit_dot(q4, acts, wv, unit_scales(sp[i] + u * gpu, all, gpu), qp, xp, u, acc[i]);
        }
    }
    if (full < p->units) { /* a last unit of fewer groups: masked loads read zeros past K */
        const int left = wbytes - full * UNIT;
        const __mmask64 bm = _cvtu64_mask64((1ull << left) - 1);
        const __mmask8 sm = (__mmask8)((1u << (p->groups - full * gpu)) - 1);
#pragma GCC unroll 4
        for (int i = 0; i < ROWS; i++) {
            const __m512i wv = _mm512_maskz_loadu_epi8(bm, wp[i] + (int64_t)full * UNIT);
            unit_dot(q4, acts, wv, unit_scales(sp[i] + full * gpu, sm, gpu), qp, xp, full, acc[i]);
        }
    }
    if (q4) { /* the min term joins each accumulator before the one reduction */
#pragma GCC unroll 4
        for (int i = 0; i < ROWS; i++)
#pragma GCC unroll 4
            for (int j = 0; j < acts; j++) acc[i][j] = min_term_vnni(p, rows[i], m0 + j, acc[i][j]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < acts; j++)
        _mm_storeu_ps(res + j * ROWS, sum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
}

#define TILE_ACTS(q4, gpu)                                                                         \
    switch (acts) {                                                                                \
    case 1:                                                                                        \
        tile_vnni(p, rows, m0, 1, q4, gpu, res);                                                   \
        break;                                                                                     \
    case 2:                                                                                        \
        tile_vnni(p, rows, m0, 2, q4, gpu, res);                                                   \
        break;                                                                                     \
    case 3:                                                                                        \
        tile_vnni(p, rows, m0, 3, q4, gpu, res);                                                   \
        break;                                                                                     \
    default:                                                                                       \
        tile_vnni(p, rows, m0, ACTS, q4, gpu, res);                                                \
        break;                                                                                     \
    }

static void tile_vnni_any(const Problem *p, const int *rows, int m0, int acts, float *res) {
    if (p->q4) {
        TILE_ACTS(1, 4)
    } else if (p->group == 16) {
        TILE_ACTS(0, 4)
    } else {
        TILE_ACTS(0, 2)
    }
}
#endif

static void store(void *out, int out_bf16, int64_t i, float v) {
    if (out_bf16)
        ((uint16_t *)out)[i] = float_to_bf16(v);
    else
        ((float *)out)[i] = v;
}

/* out[m0 + j, r0 + i] = res[j * ROWS + i] + bias[r0 + i] for the rows below n. */
static void store_tile(void *out, int out_bf16, int64_t out_stride, int m0, int acts, int r0, int n,
                       const void *bias, int bias_bf16, const float *res) {
    const int cols = n - r0 < ROWS ? n - r0 : ROWS;
#if HAVE_VNNI && ROWS == 4
    const __mmask8 k = (__mmask8)((1u << cols) - 1);
    __m128 bv = _mm_setzero_ps();
    if (bias != NULL)
        bv = bias_bf16
                 ? _mm512_castps512_ps128(bf16x16_load((const uint16_t *)bias + r0, (__mmask16)k))
                 : _mm_maskz_loadu_ps(k, (const float *)bias + r0);
    for (int j = 0; j < acts; j++) {
        const __m128 v = _mm_add_ps(_mm_loadu_ps(res + j * ROWS), bv);
        const int64_t at = (int64_t)(m0 + j) * out_stride + r0;
        if (out_bf16)
            _mm_mask_storeu_epi16((uint16_t *)out + at, k,
                                  _mm256_castsi256_si128(bf16x16_round(_mm512_castps128_ps512(v))));
        else
            _mm_mask_storeu_ps((float *)out + at, k, v);
    }
#else
    for (int i = 0; i < cols; i++) {
        const float bv = bias == NULL ? 0.f
                         : bias_bf16  ? bf16_to_float(((const uint16_t *)bias)[r0 + i])
                                      : ((const float *)bias)[r0 + i];
        for (int j = 0; j < acts; j++)
            store(out, out_bf16, (int64_t)(m0 + j) * out_stride + r0 + i, res[j * ROWS + i] + bv);
    }
#endif
}

/* A grow-only buffer per calling thread: no allocation per call once warm. */
static _Thread_local void *scratch;
static _Thread_local size_t scratch_size;

static void *scratch_get(size_t bytes) {
    if (bytes > scratch_size) {
        free(scratch);
        scratch_size = (bytes + 4095) & ~(size_t)4095;
        scratch = aligned_alloc(64, scratch_size);
        if (scratch == NULL) scratch_size = 0;
    }
    return scratch;
}

/* out[m, row] = x[m] . W[row] (+ bias[row]) for m < m_rows, row < n.
 * desc: the weight as 7 int64 (quant_linear.py builds it once per weight): data, scales and
 * mins addresses (the layout above; mins 0 for q8), q4 (1) or q8 (0), group, n, k.
 * x: m_rows rows of k values x_stride elements apart; out: m_rows rows of n values, contiguous,
 * both float32 or both bf16 (flags bit 0); bias: NULL, float32 or bf16 (flags bit 1).
 * flags >> 2: ISA_VNNI, or ISA_C for the plain C path (also on a VNNI machine).
 * Returns 0, or -1 for a shape the kernel does not take, -2 when out of memory. */
int fornax_quant_linear(const int64_t *desc, const void *x, int64_t x_stride, int m_rows,
                        const void *bias, void *out, int flags, int num_threads) {
    const int q4 = (int)desc[3], group = (int)desc[4], n = (int)desc[5], k = (int)desc[6];
    const int x_bf16 = flags & 1, bias_bf16 = (flags >> 1) & 1, isa = flags >> 2;
    const int64_t out_stride = n;
    if (m_rows <= 0 || n <= 0 || k <= 0 || (group != 16 && group != 32) || (q4 && group != 32) ||
        k % group)
        return -1;
    Problem p = {0};
    p.q4 = q4, p.group = group, p.n = n, p.k = k, p.m = m_rows, p.groups = k / group;
    p.w = (const uint8_t *)(intptr_t)desc[0];
    p.scales = (const uint16_t *)(intptr_t)desc[1];
    p.mins = (const uint16_t *)(intptr_t)desc[2];
    const int per_unit = q4 ? 128 : 64; /* elements per 64 weight bytes */
    p.units = (k + per_unit - 1) / per_unit;
    p.lanes_per_group = 16 / (per_unit / group);
    p.abytes = (int64_t)p.units * per_unit;
    const int m_pad = (m_rows + ACTS - 1) / ACTS * ACTS;
    const size_t qbytes = ((size_t)m_pad * p.abytes + 63) & ~(size_t)63;
    const size_t xbytes = (size_t)m_pad * p.units * 16 * sizeof(float);
    float *buf = scratch_get(qbytes + xbytes + (size_t)m_pad * p.groups * sizeof(float));
    if (buf == NULL) return -2;
    p.xq = (uint8_t *)buf;
    p.xsx = (float *)((uint8_t *)buf + qbytes);
    p.xsum = p.xsx + (size_t)m_pad * p.units * 16;
    const int use_vnni = HAVE_VNNI && isa == ISA_VNNI;
    const int blocks = (n + ROWS - 1) / ROWS;
    const int64_t work = (int64_t)m_rows * n * k;
#pragma omp parallel num_threads(num_threads) if (work > 200000)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < m_rows; m++)
            quantize_row(&p, x, x_bf16, (int64_t)m * x_stride, m, use_vnni);
#pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            int rows[ROWS];
            for (int i = 0; i < ROWS; i++) rows[i] = b * ROWS + i < n ? b * ROWS + i : n - 1;
            float res[ROWS * ACTS];
            for (int m0 = 0; m0 < m_rows; m0 += ACTS) {
                const int acts = m_rows - m0 < ACTS ? m_rows - m0 : ACTS;
#if HAVE_VNNI
                if (use_vnni)
                    tile_vnni_any(&p, rows, m0, acts, res);
                else
#endif
                    tile_c(&p, rows, m0, acts, res);
                store_tile(out, x_bf16, out_stride, m0, acts, b * ROWS, n, bias, bias_bf16, res);
            }
        }
    }
    (void)use_vnni;
    return 0;
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

/* Rows row_ids (NULL: rows row0, row0 + 1, ...) of a q4/q8 weight, dense, as float32 or bf16
 * (out_bf16), row-major [rows, k]: the same values as quant_format.dequantize, for embeddings
 * and large batches. */
void fornax_quant_dequantize(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, int q4,
                             int group, int k, const int64_t *row_ids, int64_t row0, int rows,
                             void *out, int out_bf16, int num_threads) {
    const int groups = k / group, wbytes = q4 ? k / 2 : k, size = out_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) if ((int64_t)rows * k > 262144) schedule(static)
    for (int i = 0; i < rows; i++) {
        const int64_t r = row_ids != NULL ? row_ids[i] : row0 + i;
        dequantize_row(w + r * wbytes, scales + r * groups, q4 ? mins + r * groups : NULL, q4,
                       group, groups, (uint8_t *)out + (int64_t)i * k * size, out_bf16, HAVE_VNNI);
    }
}
