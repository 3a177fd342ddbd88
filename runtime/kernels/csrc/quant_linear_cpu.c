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
 * The matmul core lives in quant_matmul.h (shared with decode_layers_cpu.c). Built by
 * runtime/kernels/build.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "quant_matmul.h"

int fornax_quant_linear_isa(void) { return HAVE_VNNI ? ISA_VNNI : ISA_C; }

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
    const int x_bf16 = flags & 1, isa = flags >> 2;
    Problem p;
    const int status = quant_problem(&p, desc, m_rows, out, x_bf16, bias, (flags >> 1) & 1);
    if (status != 0) return status;
    uint8_t *buf = scratch_get(0, quant_buffer_bytes(&p));
    if (buf == NULL) return -2;
    quant_buffers(&p, buf);
    const int use_vnni = HAVE_VNNI && isa == ISA_VNNI;
    const int serial = (int64_t)m_rows * p.k <= 16384; /* a few rows: no barrier for them */
    if (serial)
        for (int m = 0; m < m_rows; m++)
            quantize_row(&p, x, x_bf16, (int64_t)m * x_stride, m, use_vnni);
#pragma omp parallel num_threads(num_threads) if ((int64_t)m_rows * p.n * p.k > 200000)
    {
        if (!serial) {
#pragma omp for schedule(static)
            for (int m = 0; m < m_rows; m++)
                quantize_row(&p, x, x_bf16, (int64_t)m * x_stride, m, use_vnni);
        }
        quant_panels(&p, use_vnni);
    }
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
