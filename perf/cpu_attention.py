"""`fornax bench cpu-attention`: CPU attention backends side by side, cpu_paged vs torch_ref (CLI).

Decode cases time one step's attention over every layer of a model shape (one cache per layer,
so a step streams the whole KV cache from memory as the engine's does); prefill cases time one
prompt's causal attention, fresh or continuing a cached context. The backends alternate round by
round so machine noise hits both alike; medians are recorded.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from typing import Any

from fornax.perf.common import check_threads, int_list, make_record, median, print_table, write_json
from fornax.perf.kernel_bench import add_kernel_shape_args, alternating_rounds

logger = logging.getLogger(__name__)

BACKENDS = ("torch_ref", "cpu_paged")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cpu-attention", help="time CPU attention: cpu_paged kernels vs torch_ref (CPU)",
        description="Time decode steps (all layers, batch sizes at one context length) and "
                    "prefills (fresh and chunked) with the cpu_paged and torch_ref backends.")
    p.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes")
    p.add_argument("--context-len", type=int, default=400, help="decode context length")
    p.add_argument("--prompt-lens", default="128,512,2048", help="fresh prefill lengths")
    p.add_argument("--chunk", default="512:512",
                   help="chunked prefill NEW:CACHED (new tokens after a cached context)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    add_kernel_shape_args(p, rounds=5, linear=False)
    p.set_defaults(func=run)
    return p


def paged_step(q_lens: list[int], ctx_lens: list[int], block_size: int,
               seed: int = 0) -> tuple[Any, int]:
    """A step's attention metadata: request i adds q_lens[i] tokens after ctx_lens[i] cached
    ones, its blocks scattered over a shuffled pool (one spare column in the block table).
    Returns (CommonAttentionMetadata, number of cache blocks); the kernels' tests use it too."""
    import numpy as np
    import torch

    from fornax.runtime.attention.backend import CommonAttentionMetadata

    n = len(q_lens)
    seq = np.array([c + q for c, q in zip(ctx_lens, q_lens)], dtype=np.int32)
    max_blocks = int(-(-seq.max() // block_size)) + 1
    num_blocks = n * max_blocks + 1
    table = np.random.RandomState(seed).permutation(np.arange(1, num_blocks))
    table = table.reshape(n, max_blocks).astype(np.int32)
    qsl = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(q_lens, out=qsl[1:])
    pos = np.concatenate([np.arange(c, c + q) for c, q in zip(ctx_lens, q_lens)])
    req = np.repeat(np.arange(n), q_lens)
    slots = torch.from_numpy(table[req, pos // block_size].astype(np.int64) * block_size
                             + pos % block_size)
    common = CommonAttentionMetadata(qsl, seq, table, slots, n,
                                     int(qsl[-1]), int(max(q_lens)), int(seq.max()), block_size)
    return common, num_blocks


def _case(name: str, q_lens: list[int], ctx_lens: list[int], layers: int,
          args: argparse.Namespace, gen: Any) -> dict[str, Any]:
    """One step's inputs: the metadata, q/k/v and `layers` caches."""
    import torch

    common, num_blocks = paged_step(q_lens, ctx_lens, args.block_size)
    dtype = getattr(torch, args.dtype)
    h, kv, d = args.num_heads, args.num_kv_heads, args.head_dim
    caches = [torch.randn(num_blocks, 2, args.block_size, kv, d, generator=gen).to(dtype)
              for _ in range(layers)]
    qkv = [torch.randn(common.num_actual_tokens, heads, d, generator=gen).to(dtype)
           for heads in (h, kv, kv)]
    return {"name": name, "common": common, "caches": caches, "qkv": qkv}


def _time_case(backend: Any, case: dict[str, Any], calls: int) -> float:
    """Seconds for one step: metadata once, then the attention of every layer."""
    import time

    start = time.perf_counter()
    meta = backend.build_metadata(case["common"])
    q, k, v = case["qkv"]
    caches = case["caches"]
    for i in range(calls):
        backend.forward(q, k, v, caches[i % len(caches)], meta)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    import torch

    from fornax.runtime.attention.backend import make_attention_backend

    check_threads()
    backends = {name: make_attention_backend(
        name, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
        block_size=args.block_size, dtype=getattr(torch, args.dtype), device=torch.device("cpu"))
        for name in BACKENDS}
    record = make_record("cpu_attention", args.model_name, vars(args))
    gen = torch.Generator().manual_seed(0)
    cases = []
    for b in int_list(args.batch_sizes):
        cases.append(_case(f"decode_b{b}", [1] * b, [args.context_len - 1] * b,
                           args.num_layers, args, gen))
    for n in int_list(args.prompt_lens):
        cases.append(_case(f"prefill_q{n}", [n], [0], 1, args, gen))
    if args.chunk:
        new, cached = (int(x) for x in str(args.chunk).split(":"))
        cases.append(_case(f"chunk_q{new}_ctx{cached}", [new], [cached], 1, args, gen))
    table, metrics, details = [], {}, {}
    for case in cases:
        times = alternating_rounds(
            {name: partial(_time_case, backend, case, args.num_layers)
             for name, backend in backends.items()}, args.rounds)
        ref, fast = median(times["torch_ref"]), median(times["cpu_paged"])
        name = case["name"]
        metrics[f"torch_ref_ms_{name}"] = ref * 1e3
        metrics[f"cpu_paged_ms_{name}"] = fast * 1e3
        metrics[f"speedup_{name}"] = ref / fast
        details[name] = {k: [t * 1e3 for t in v] for k, v in times.items()}
        table.append([name, ref * 1e3, fast * 1e3, ref / fast])
        logger.info("%s: torch_ref %.2f ms, cpu_paged %.2f ms", name, ref * 1e3, fast * 1e3)
    record["metrics"] = metrics
    record["details"] = {"rounds_ms": details, "backends": list(BACKENDS)}
    print_table(table, ["case", "torch_ref ms", "cpu_paged ms", "speedup"],
                title=f"attention of {args.model_name} over {args.num_layers} layers, "
                      f"{args.dtype}, {torch.get_num_threads()} thread(s)")
    write_json(record, args.output_json)
    return 0
