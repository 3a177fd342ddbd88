"""`fornax bench sampler`: the batched sampler alone on synthetic logits (CLI process).

Three workloads over the same [batch, vocab] logits: all-greedy, mixed parameters (temperature,
top-k/p, min-p, penalties, logit bias, seeds), and mixed with top-20 logprobs. The greedy batch
must not pay for the machinery the others use.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np

from fornax.perf.common import check_threads, make_record, print_table, summarize, write_json

logger = logging.getLogger(__name__)

HEADLINE = ("greedy_median_ms", "mixed_median_ms", "mixed_logprobs_median_ms",
            "mixed_over_greedy")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sampler", help="time the sampler alone (greedy vs mixed params)",
                              description="Time one sampling pass over [batch, vocab] logits.")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=128 * 1024)
    p.add_argument("--num-iters", type=int, default=20)
    p.add_argument("--num-iters-warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logits", choices=("zipf", "gaussian"), default="zipf",
                   help="zipf: a language-like rank-frequency profile, p(rank) ~ rank^-1.5, on a "
                        "random token order per row; gaussian: N(0, 3^2), flat, the worst case "
                        "for top-p (the nucleus spans most of the vocabulary)")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p


def _params(kind: str, batch: int, rng: np.random.Generator) -> list[Any]:
    from fornax.runtime.sampling.params import SamplingParams

    if kind == "greedy":
        return [SamplingParams(temperature=0.0) for _ in range(batch)]
    out = []
    for i in range(batch):
        out.append(SamplingParams(
            temperature=float(rng.uniform(0.3, 1.5)), top_k=int(rng.choice([-1, 20, 50])),
            top_p=float(rng.choice([1.0, 0.9, 0.95])), min_p=float(rng.choice([0.0, 0.05])),
            seed=i if i % 4 == 0 else None,
            frequency_penalty=0.5 if i % 3 == 0 else 0.0,
            logit_bias={7: 2.0} if i % 5 == 0 else None,
            logprobs=20 if kind == "mixed_logprobs" else None))
    return out


def _time_kind(kind: str, args: argparse.Namespace, logits: Any) -> list[float]:
    import torch

    from fornax.runtime.worker.input_batch import InputBatch
    from fornax.runtime.worker.model_runner import ModelRunner

    rng = np.random.default_rng(args.seed)
    params = _params(kind, args.batch_size, rng)
    batch = InputBatch(args.batch_size, 64, 4)
    device = torch.device(args.device)
    for i, p in enumerate(params):
        prompt = rng.integers(0, args.vocab_size, 32).tolist()
        batch.add(f"r{i}", prompt + rng.integers(0, args.vocab_size, 8).tolist(), 32, 40, [1],
                  p, device)
    # The runner's host-side metadata assembly is part of what a step pays: reuse it.
    runner = ModelRunner.__new__(ModelRunner)
    runner.batch, runner.device, runner.vocab_size = batch, device, args.vocab_size
    runner.eos_token_ids = frozenset({0})
    from fornax.runtime.sampling.sampler import Sampler

    sampler = Sampler()
    rows = np.arange(args.batch_size)
    ids = [f"r{i}" for i in range(args.batch_size)]
    times = []
    for it in range(args.num_iters_warmup + args.num_iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        meta = runner._sampling_metadata(rows, ids)
        out = sampler(logits, meta)
        out.sampled.tolist()  # the step's one device->host sync
        if out.logprobs is not None:
            out.logprobs.tolist()
        if it >= args.num_iters_warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def run(args: argparse.Namespace) -> int:
    import torch

    check_threads()
    record = make_record("sampler", "synthetic", vars(args))
    gen = torch.Generator().manual_seed(args.seed)
    if args.logits == "gaussian":
        logits = torch.randn(args.batch_size, args.vocab_size, generator=gen) * 3
    else:
        ranks = torch.arange(1, args.vocab_size + 1, dtype=torch.float32)
        order = torch.rand(args.batch_size, args.vocab_size, generator=gen).argsort(dim=-1)
        logits = (-1.5 * ranks.log())[order]
    logits = logits.to(args.device)
    rows = []
    for kind in ("greedy", "mixed", "mixed_logprobs"):
        times = _time_kind(kind, args, logits)
        stats = summarize(times, kind, "ms")
        record["details"][kind] = stats
        record["metrics"][f"{kind}_median_ms"] = stats[f"median_{kind}_ms"]
        rows.append([kind, stats[f"median_{kind}_ms"], stats[f"p90_{kind}_ms"]])
    m = record["metrics"]
    m["mixed_over_greedy"] = m["mixed_median_ms"] / m["greedy_median_ms"]
    print_table(rows, headers=["workload", "median ms", "p90 ms"],
                title=f"sampler: batch {args.batch_size} x vocab {args.vocab_size} "
                      f"({args.logits} logits) on {args.device}")
    write_json(record, args.output_json)
    return 0
