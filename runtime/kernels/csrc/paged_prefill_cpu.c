/* Paged prefill attention on the CPU (bf16, AVX512-BF16), the per-op kernel: every multi-token
 * request of a step in one call (the work itself: paged_prefill.h, shared with the fused call).
 * Built by runtime/kernels/build.py.
 */
#include <stdint.h>

#include "bf16.h"
#include "paged_prefill.h"

#if HAVE_PAGED_PREFILL
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
    const PrefillAttn p = {q,           cache,        q_stride, out_stride, bt_stride, out,
                           block_table, NULL,         q_starts, q_lens,     seq_lens,  num_reqs,
                           num_q_heads, num_kv_heads, head_dim, block_size, scale};
    int64_t max_keys = 0;
    const int64_t items = prefill_attn_plan(&p, &max_keys);
    if (items < 0) return -1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        const int ok = pf_scratch_reserve(max_keys, head_dim) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        prefill_attn_items(&p, items, ok);
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
