"""`fornax bench cpu-linear`: a model's bf16 linear layers on CPU, oneDNN packs vs AMX tiles (CLI).

Without AMX-BF16 only oneDNN is timed (its rate says how much room a custom kernel would have).

Every layer of a decoder (qkv, o, gate_up, down per layer, plus the LM head) is timed at several
row counts with weights laid out as the engine packs them, one copy per layer, so a pass streams
the whole model from memory the way a decode step does. The two kernels alternate round by
round, so machine noise hits both alike; the medians and the weight-read rate are recorded.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from typing import Any

from fornax.perf.common import check_threads, int_list, make_record, median, print_table, write_json
from fornax.perf.kernel_bench import add_kernel_shape_args, alternating_rounds

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cpu-linear", help="time a model's bf16 linear layers: oneDNN vs AMX (CPU)",
        description="Time each bf16 linear layer of a decoder shape per row count: oneDNN vs AMX.")
    add_kernel_shape_args(p, rounds=7, linear=True)
    p.add_argument("--rows", default="1,8,16,32,64,256",
                   help="comma-separated row counts (batched tokens per step)")
    p.set_defaults(func=run)
    return p


def layer_shapes(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(name, out_features, in_features, copies) of every linear layer of the decoder."""
    h, d = args.hidden_size, args.head_dim
    qkv = (args.num_heads + 2 * args.num_kv_heads) * d
    layers = args.num_layers
    return [("qkv", qkv, h, layers), ("o", h, args.num_heads * d, layers),
            ("gate_up", 2 * args.intermediate_size, h, layers),
            ("down", h, args.intermediate_size, layers), ("lm_head", args.vocab_size, h, 1)]


def run(args: argparse.Namespace) -> int:
    import torch

    from fornax.runtime.kernels.amx_linear import amx_supported
    from fornax.runtime.kernels.packing import pack_weight, packed_linear

    check_threads()
    kinds = ("onednn", "amx") if amx_supported() else ("onednn",)
    if len(kinds) == 1:
        logger.warning("this CPU (or kernel) has no AMX-BF16: timing oneDNN only")
    rows_list = int_list(args.rows)
    record = make_record("cpu_linear", args.model_name, vars(args))
    shapes = layer_shapes(args)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    # per kind: (in_features, one pack per layer copy) for every layer kind
    packs: dict[str, list[tuple[int, list[Any]]]] = {kind: [] for kind in kinds}
    weight_bytes = 0
    for _name, out_f, in_f, copies in shapes:
        weights = [torch.randn(out_f, in_f, generator=gen).to(torch.bfloat16)
                   for _ in range(copies)]
        for kind in kinds:
            packs[kind].append((in_f, [pack_weight(w, kind) for w in weights]))
        weight_bytes += out_f * in_f * 2 * copies
    record["startup"]["pack_s"] = time.perf_counter() - start
    in_sizes = sorted({in_f for _n, _o, in_f, _c in shapes})
    table, metrics, details = [], {}, {}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in in_sizes}
        times = alternating_rounds(
            {kind: partial(_time_layers, packs[kind], xs, packed_linear) for kind in kinds},
            args.rounds)
        one = median(times["onednn"])
        flops = 2 * rows * (weight_bytes // 2)  # a multiply and an add per weight and row
        metrics[f"onednn_ms_m{rows}"] = one * 1e3
        metrics[f"onednn_gflops_m{rows}"] = flops / one / 1e9
        row = [rows, one * 1e3, weight_bytes / one / 1e9, flops / one / 1e9]
        if "amx" in kinds:
            tiles = median(times["amx"])
            metrics[f"amx_ms_m{rows}"] = tiles * 1e3
            metrics[f"amx_speedup_m{rows}"] = one / tiles
            row += [tiles * 1e3, weight_bytes / tiles / 1e9, one / tiles]
        details[f"m{rows}"] = {k: [t * 1e3 for t in v] for k, v in times.items()}
        table.append(row)
    metrics["weight_gbytes"] = weight_bytes / 1e9
    record["metrics"] = metrics
    record["details"] = {"layers": [list(s) for s in shapes], "rounds_ms": details}
    headers = ["rows", "oneDNN ms", "oneDNN GB/s", "oneDNN GFLOP/s"]
    if "amx" in kinds:
        headers += ["AMX ms", "AMX GB/s", "AMX speedup"]
    print_table(table, headers,
                title=f"bf16 linear layers of {args.model_name}, "
                      f"{torch.get_num_threads()} thread(s)")
    write_json(record, args.output_json)
    return 0


def _time_layers(packs: list[tuple[int, list[Any]]], xs: dict[int, Any], linear: Any) -> float:
    """One pass over every layer kind: the seconds of each kind's pass, summed."""
    return sum(_time_group(group, xs[in_f], linear) for in_f, group in packs)


def _time_group(group: list[Any], x: Any, linear: Any) -> float:
    """One pass over a layer kind's copies (each a different weight, as in the model)."""
    start = time.perf_counter()
    for packed in group:
        linear(x, packed, None)
    return time.perf_counter() - start
