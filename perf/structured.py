"""`fornax bench structured`: time per output token of a batch constrained by a JSON schema
against the same batch unconstrained (CLI process).

Both runs decode the same prompts greedily for exactly `--output-len` tokens: the schema asks for
a catalogue of at least 12 products, which no model finishes in that many tokens, so the batch
keeps its size and the only difference is the grammar (bitmask fill, overlapped with the forward,
and its application to the logits). Iterations alternate the two modes so drift cancels out; the
grammar's one-time compilation is reported apart, under `startup`.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from fornax.perf import offline
from fornax.perf.common import check_threads, make_record, median, print_table, write_json

logger = logging.getLogger(__name__)

TARGET_RATIO = 1.10  # constrained TPOT / unconstrained TPOT we aim to stay under
PRODUCT = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "price": {"type": "number", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    "in_stock": {"type": "boolean"}},
    "required": ["name", "price", "tags", "in_stock"]}
SCHEMA = {"type": "object", "properties": {
    "store": {"type": "string", "maxLength": 40},
    "products": {"type": "array", "items": PRODUCT, "minItems": 12}},
    "required": ["store", "products"]}
THEMES = ("bakery", "bike shop", "bookshop", "garden centre", "hardware store", "toy shop",
          "tea house", "record store", "pharmacy", "fish market", "florist", "camera shop",
          "shoe shop", "cheese shop", "music school", "ski rental")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "structured", help="time per output token with a JSON schema vs unconstrained",
        description="Decode one batch of chat prompts for a fixed number of tokens with and "
                    "without a JSON-schema constraint (xgrammar) and compare time per output "
                    f"token (target: at most {TARGET_RATIO:.2f}x).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=4, help="timed iterations of each mode")
    p.add_argument("--output-json", default=None)
    offline.add_engine_args(p)
    p.set_defaults(func=run)
    return p


def _prompts(llm: Any, batch: int, iteration: int) -> list[list[int]]:
    """Chat prompts asking for a catalogue; fresh text per iteration (no prefix-cache carry)."""
    prompts = []
    for i in range(batch):
        theme = THEMES[i % len(THEMES)]
        ask = (f"Iteration {iteration}, shop {i}: list the products of a {theme} as JSON, with "
               "the store name and, per product, its name, price, tags and stock.")
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": ask}])
        prompts.append(llm.tokenizer.chat_prompt_ids(text))
    return prompts


def _timed(llm: Any, prompts: list[list[int]], params: Any) -> dict[str, Any]:
    timer = offline.StepTimer(llm.engine)
    llm.engine = timer
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        llm.engine = timer.engine
    n = params.max_tokens
    ttft = max(timer.first_token_at.values()) - start
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    finishes = sorted({o.outputs[0].finish_reason for o in outputs})
    decode_ms = [1e3 * (s.end - s.start) for s in timer.steps if s.num_first_tokens == 0]
    return {"elapsed_s": elapsed, "ttft_s": ttft, "tpot_ms": 1e3 * (elapsed - ttft) / (n - 1),
            "mean_decode_step_ms": sum(decode_ms) / max(len(decode_ms), 1),
            "cpu_s": cpu,  # all threads of the process: less sensitive to a busy machine
            "num_output_tokens": sum(tokens), "finish_reasons": finishes,
            "texts": [o.outputs[0].text for o in outputs[:2]]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fornax.runtime import SamplingParams
    from fornax.runtime.sampling.params import StructuredOutputsParams

    check_threads()
    offline.set_threads(args.num_threads)
    if args.peer != "none":
        raise SystemExit("bench structured compares fornax with itself; --peer is not used")
    if args.batch_size < 1 or args.output_len < 2 or args.num_iters < 1:
        raise SystemExit("--batch-size >= 1, --output-len >= 2 and --num-iters >= 1 please")
    llm, load_s = offline.build_llm(args)
    constraint = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    llm.engine.structured.compile(constraint)  # cold compile, cached for every request after
    compile_s = time.perf_counter() - start
    modes = {"free": SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True),
             "json": SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                                    structured_outputs=constraint)}
    results: dict[str, list[dict[str, Any]]] = {"free": [], "json": []}
    warm_s = 0.0
    for it in range(args.num_iters_warmup + args.num_iters):
        order = ("free", "json") if it % 2 == 0 else ("json", "free")
        prompts = _prompts(llm, args.batch_size, it)
        for mode in order:
            result = _timed(llm, prompts, modes[mode])
            if it < args.num_iters_warmup:
                warm_s += result["elapsed_s"]
            else:
                results[mode].append(result)
            logger.info("iteration %d %s: %.2f ms per output token", it, mode, result["tpot_ms"])
    record = make_record("structured", offline.model_label(args, llm), vars(args))
    record["startup"] = {"load_s": load_s, "grammar_compile_s": compile_s, "warmup_s": warm_s}
    metrics: dict[str, Any] = {}
    for mode, runs in results.items():
        metrics[f"{mode}_tpot_ms"] = median([r["tpot_ms"] for r in runs])
        metrics[f"{mode}_decode_step_ms"] = median([r["mean_decode_step_ms"] for r in runs])
        metrics[f"{mode}_ttft_ms"] = 1e3 * median([r["ttft_s"] for r in runs])
        metrics[f"{mode}_cpu_s"] = median([r["cpu_s"] for r in runs])
    ratio = metrics["json_tpot_ms"] / metrics["free_tpot_ms"]
    record["metrics"] = metrics
    record["ratios"] = {"json_over_free_tpot": ratio, "target": TARGET_RATIO,
                        "json_over_free_cpu": metrics["json_cpu_s"] / metrics["free_cpu_s"]}
    record["details"] = {"schema": SCHEMA, "iterations": results}
    print_table([[mode, f"{metrics[f'{mode}_tpot_ms']:.2f}",
                  f"{metrics[f'{mode}_decode_step_ms']:.2f}", f"{metrics[f'{mode}_ttft_ms']:.0f}"]
                 for mode in ("free", "json")],
                headers=["mode", "tpot ms", "decode step ms", "ttft ms"],
                title=f"batch {args.batch_size} x {args.output_len} tokens: json/free = "
                      f"{ratio:.3f} (target <= {TARGET_RATIO:.2f})")
    if ratio > TARGET_RATIO:
        logger.warning("constrained decoding costs %.1f%% per token, over the %.0f%% target",
                       100 * (ratio - 1), 100 * (TARGET_RATIO - 1))
    write_json(record, args.output_json)
    return record
