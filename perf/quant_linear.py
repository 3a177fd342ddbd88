"""`fornax bench quant-linear`: a model's linear layers as weight-only q4/q8 kernels vs bf16 packs (CLI).

Each layer kind of the decoder (qkv, o, gate_up, down, LM head) is timed at several row counts,
one weight copy per layer as the engine holds them, so a pass streams the whole model the way a
decode step does: the bf16 path is runtime/kernels/packing.py (oneDNN packs, AMX tiles where the
CPU has them), the quantized one runtime/kernels/quant_linear.py on q4 (Q4_1-like: 4.5+ bits per
weight with float16 scale and min per 32) or q8 (Q8_0-like) weights, prepared in the kernel's
panel layout at setup as the loader does. Sides alternate round by
round so machine noise hits them alike; per layer kind the median milliseconds and the rate at
which weight bytes were read (GB/s) are recorded.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from fornax.perf.common import check_threads, int_list, make_record, median, print_table, write_json
from fornax.perf.cpu_linear import layer_shapes
from fornax.perf.kernel_bench import add_kernel_shape_args, alternating_rounds

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quant-linear", help="time a model's linear layers: q4/q8 weight-only kernels vs bf16",
        description="Time each linear layer kind of a decoder shape per row count: quantized "
                    "(q4, q8) weight-only kernels vs the bf16 packed path (CPU).")
    add_kernel_shape_args(p, rounds=7, linear=True)
    p.add_argument("--rows", default="1,4,16,128,512",
                   help="comma-separated row counts (batched tokens per step)")
    p.add_argument("--kinds", default="bf16,q4,q8", help="comma-separated: bf16, q4, q8")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (with OMP_NUM_THREADS=1 on a "
                        "shared, busy machine: time spent descheduled is not counted)")
    p.set_defaults(func=run)
    return p


def quantize_for_bench(weight: Any, kind: str) -> Any:
    """A QuantWeight of `weight` [N, K] float32: q4 with min per 32 (like Q4_1) or q8 per 32
    (like Q8_0), by round-to-nearest (timing data, not a GGUF-exact quantizer)."""
    import torch

    from fornax.runtime.kernels.quant_format import QuantWeight

    n, k = weight.shape
    groups = weight.reshape(n, k // 32, 32)
    if kind == "q8":
        scale = (groups.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
        q = torch.round(groups / scale).clamp(-127, 127).to(torch.int8).reshape(n, k)
        return QuantWeight("q8", n, k, 32, q, scale[..., 0].half(), None, "bench-q8")
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.uint8)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
    return QuantWeight("q4", n, k, 32, packed.contiguous(), scale[..., 0].half(),
                       low[..., 0].half(), "bench-q4")


def run(args: argparse.Namespace) -> int:
    import torch

    from fornax.runtime.kernels.amx_linear import amx_supported
    from fornax.runtime.kernels.packing import pack_weight, packed_linear
    from fornax.runtime.kernels.quant_format import nbytes
    from fornax.runtime.kernels.quant_linear import (
        DENSE_MIN_ROWS,
        prepare_in_place,
        quant_isa,
        quant_linear,
    )

    check_threads()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - {"bf16", "q4", "q8"}
    if unknown:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)} (bf16, q4, q8)")
    record = make_record("quant_linear", args.model_name, vars(args))
    record["config"].update(quant_isa=quant_isa(), amx=amx_supported(), layout="panel16",
                            dense_min_rows=DENSE_MIN_ROWS, threads=torch.get_num_threads())
    shapes = layer_shapes(args)
    gen = torch.Generator().manual_seed(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    start = time.perf_counter()
    weights: dict[str, dict[str, list[Any]]] = {kind: {} for kind in kinds}
    nbytes_of: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
    for name, out_f, in_f, copies in shapes:
        for kind in kinds:
            weights[kind][name], nbytes_of[kind][name] = [], 0
        for _ in range(copies):
            w = torch.randn(out_f, in_f, generator=gen) * 0.05
            for kind in kinds:
                if kind == "bf16":
                    weights[kind][name].append(pack_weight(w.to(torch.bfloat16)))
                    nbytes_of[kind][name] += out_f * in_f * 2
                else:
                    qw = prepare_in_place(quantize_for_bench(w, kind))
                    weights[kind][name].append(qw)
                    nbytes_of[kind][name] += nbytes(qw)
    record["startup"]["prepare_s"] = time.perf_counter() - start
    linear: dict[str, Callable[..., Any]] = {"bf16": packed_linear, "q4": quant_linear,
                                             "q8": quant_linear}
    table, metrics, details = [], {}, {}
    for rows in int_list(args.rows):
        xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16)
              for k in sorted({s[2] for s in shapes})}
        for name, _out_f, in_f, _copies in shapes:
            def timer(kind: str, layer: str = name, x: Any = xs[in_f]) -> float:
                fn, start = linear[kind], clock()
                for w in weights[kind][layer]:
                    fn(x, w, None)
                return clock() - start

            timers: dict[str, Callable[[], float]] = {k: partial(timer, k) for k in kinds}
            times = alternating_rounds(timers, args.rounds)
            row: list[Any] = [rows, name]
            for kind in kinds:
                t = median(times[kind])
                gbs = nbytes_of[kind][name] / t / 1e9
                metrics[f"{kind}_{name}_ms_m{rows}"] = t * 1e3
                metrics[f"{kind}_{name}_gbs_m{rows}"] = gbs
                row += [t * 1e3, gbs]
            if "bf16" in kinds:
                for kind in kinds:
                    if kind != "bf16":
                        speedup = median(times["bf16"]) / median(times[kind])
                        metrics[f"{kind}_{name}_speedup_m{rows}"] = speedup
                        row.append(speedup)
            details[f"{name}_m{rows}"] = {k: [t * 1e3 for t in v] for k, v in times.items()}
            table.append(row)
        whole: list[Any] = [rows, "all"]
        for kind in kinds:
            total = sum(metrics[f"{kind}_{s[0]}_ms_m{rows}"] for s in shapes)
            metrics[f"{kind}_total_ms_m{rows}"] = total
            whole += [total, sum(nbytes_of[kind].values()) / total / 1e6]
        base = metrics.get(f"bf16_total_ms_m{rows}")
        whole += [base / metrics[f"{k}_total_ms_m{rows}"] for k in kinds if k != "bf16" and base]
        table.append(whole)
    for kind in kinds:
        metrics[f"{kind}_weight_gbytes"] = sum(nbytes_of[kind].values()) / 1e9
    record["metrics"] = metrics
    record["details"] = {"layers": [list(s) for s in shapes], "rounds_ms": details}
    headers = ["rows", "layer"]
    for kind in kinds:
        headers += [f"{kind} ms", f"{kind} GB/s"]
    headers += [f"{k} speedup" for k in kinds if k != "bf16" and "bf16" in kinds]
    print_table(table, headers, title=f"linear layers of {args.model_name}, "
                                      f"{torch.get_num_threads()} thread(s), {args.clock} clock, kernel "
                                      f"{quant_isa()}; 'all': one pass over every layer")
    write_json(record, args.output_json)
    return 0
