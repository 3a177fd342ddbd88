"""Where one decode step's time goes at small batch: engine phases, host work, the forward's
ATen time against its Python dispatch, detokenize and output encoding (tool, one process).

    python -m fornax.perf.step_split [--batch-size 1] [--dtype bfloat16] [--no-enforce-eager]
        [--output-json perf/results/step_overhead/NAME.json]

It runs the offline engine on the packaged SmolLM2 (or --model) with greedy, ignore-EOS
requests and wraps the phases of each decode step with `time.perf_counter` timers (the timers
cost ~1 us each): schedule, the runner's state update and input preparation, the attention
metadata, the model forward, logits, sampler, recording the samples, the scheduler's update,
and the engine's output building. Then, over a few more steps under `torch.profiler`, it splits
the forward into time inside ATen ops and the rest (Python and module dispatch; the profiler's
own per-op cost lands in the ATen share, so the Python share is a lower bound). Detokenize and
msgpack encoding of the outputs, which run in the API worker and the output thread when serving,
are timed apart on the step's own outputs.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fornax.perf import common

logger = logging.getLogger(__name__)

# (label, object path from the engine, attribute): the phases wrapped, outermost first
_PHASES = (
    ("step", "", "step"),
    ("schedule", "scheduler", "schedule"),
    ("execute_model", "runner", "execute_model"),
    ("update_states", "runner", "_update_states"),
    ("prepare_inputs", "runner", "_prepare_inputs"),
    ("build_metadata", "runner.backend", "build_metadata"),
    ("forward", "runner", "forward_fn"),
    ("sample", "runner", "_sample"),
    ("compute_logits", "runner.model", "compute_logits"),
    ("sampling_metadata", "runner", "_sampling_metadata"),
    ("sampler", "runner", "sampler"),
    ("record_samples", "runner.batch", "record_samples"),
    ("update_from_output", "scheduler", "update_from_output"),
    ("outputs", "", "_outputs"),
)


def _resolve(root: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root


def install_timers(engine: Any, sink: dict[str, list[float]],
                   clock: Callable[[], float] = time.perf_counter) -> Callable[[], None]:
    """Wrap each phase on its instance; returns the function that removes the wrappers."""
    undo = []
    for label, path, attr in _PHASES:
        owner = _resolve(engine, path)
        inner = getattr(owner, attr)

        def timed(*args: Any, _inner: Any = inner, _label: str = label, **kwargs: Any) -> Any:
            start = clock()
            try:
                return _inner(*args, **kwargs)
            finally:
                sink[_label].append(clock() - start)

        had_own = attr in vars(owner)
        setattr(owner, attr, timed)
        undo.append((owner, attr, inner, had_own))

    def remove() -> None:
        for owner, attr, inner, had_own in reversed(undo):
            if had_own:
                setattr(owner, attr, inner)
            else:
                delattr(owner, attr)
    return remove


def _requests(batch: int, input_len: int, max_tokens: int, vocab: int) -> list[Any]:
    from fornax.runtime.engine.messages import EngineCoreRequest
    from fornax.runtime.sampling.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [EngineCoreRequest(f"split-{i}", [(37 * j + 11 * i) % (vocab - 100) + 50
                                             for j in range(input_len)], params)
            for i in range(batch)]


def _decode_steps(engine: Any, batch: int, input_len: int, steps: int, vocab: int,
                  on_step: Callable[[list[Any]], None] | None = None) -> None:
    """Admit `batch` requests, prefill them, then run `steps` decode steps."""
    for req in _requests(batch, input_len, steps + 2, vocab):
        engine.add_request(req)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(steps):
        outputs = engine.step()
        if on_step is not None:
            on_step(outputs)
    engine.abort_requests(list(engine.scheduler.requests))
    while engine.has_unfinished_requests():
        engine.step()


def _forward_aten_split(engine: Any, batch: int, input_len: int, steps: int,
                        vocab: int) -> dict[str, float]:
    """Per decode forward: wall time, time inside top-level ATen ops, and their count."""
    from torch.profiler import ProfilerActivity, profile

    walls: list[float] = []
    runner = engine.runner
    inner = runner.forward_fn

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args)
        finally:
            walls.append(time.perf_counter() - start)

    events: list[Any] = []
    runner.forward_fn = timed
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _decode_steps(engine, batch, input_len, steps, vocab)
        events = list(prof.events())
    finally:
        runner.forward_fn = inner
    # top-level ops only (an op called inside another is counted in its parent's time)
    top = [e for e in events if e.cpu_parent is None and not e.name.startswith("ProfilerStep")]
    aten_us = sum(e.cpu_time_total for e in top)
    num_ops = len(top)
    num_forwards = len(walls)
    wall = sum(walls)
    # the ops counted include those of the prefill step(s) and the sampler; scale by forwards
    return {"forward_wall_ms_profiled": 1e3 * wall / max(num_forwards, 1),
            "top_level_ops_per_step": num_ops / max(num_forwards, 1),
            "aten_ms_per_step": 1e-3 * aten_us / max(num_forwards, 1)}


def _encode_and_detok_ms(llm: Any, outputs: list[Any]) -> dict[str, float]:
    """msgpack encode of a step's outputs (output thread) and incremental detokenize of its
    tokens (API worker), per step, timed on this step's outputs."""
    import msgspec

    from fornax.runtime.text.detokenizer import IncrementalDetokenizer

    encoder = msgspec.msgpack.Encoder()
    reps = 200
    start = time.perf_counter()
    for _ in range(reps):
        encoder.encode(outputs)
    encode_ms = 1e3 * (time.perf_counter() - start) / reps  # (a few microseconds)
    tok = llm.tokenizer.tokenizer if hasattr(llm.tokenizer, "tokenizer") else llm.tokenizer
    detoks = [IncrementalDetokenizer(tok, [50, 60, 70]) for _ in outputs]
    start = time.perf_counter()
    for k in range(reps):
        for d, o in zip(detoks, outputs):
            d.update([(o.new_token_ids[0] + k) % 1000 + 100] if o.new_token_ids else [])
            d.take_delta(False)
    detok_ms = 1e3 * (time.perf_counter() - start) / reps
    return {"msgpack_encode_us": 1e3 * encode_ms, "detokenize_us": 1e3 * detok_ms}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fornax.perf import offline
    from fornax.runtime import LLM

    common.check_threads()
    offline.set_threads(args.num_threads)
    kwargs: dict[str, Any] = {"dtype": args.dtype, "enable_prefix_caching": False,
                              "max_model_len": args.max_model_len}
    if args.enforce_eager is not None:
        kwargs["enforce_eager"] = args.enforce_eager
    start = time.perf_counter()
    llm = LLM(args.model, **kwargs)
    load_s = time.perf_counter() - start
    engine = llm.engine
    vocab = engine.info.vocab_size
    _decode_steps(engine, args.batch_size, args.input_len, args.warmup, vocab)  # warm-up

    sink: dict[str, list[float]] = defaultdict(list)
    last_outputs: list[Any] = []

    def keep(outputs: list[Any]) -> None:
        last_outputs[:] = outputs

    # cpu: this thread's CPU time, which a loaded machine does not inflate (exact for the whole
    # step with OMP_NUM_THREADS=1; with more threads the forward's other threads are not counted)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    remove = install_timers(engine, sink, clock)
    try:
        for key in sink:
            sink[key].clear()
        _decode_steps(engine, args.batch_size, args.input_len, args.steps, vocab, keep)
    finally:
        remove()
    # only decode steps: drop the prefill steps and the abort steps around them
    n = args.steps
    phases = {}
    for label, _, _ in _PHASES:
        values = sink[label]
        if label in ("step", "schedule", "update_from_output", "outputs"):
            values = values[-(n + 1):-1] if len(values) > n else values
        else:
            values = values[-n:]
        phases[f"{label}_ms"] = 1e3 * common.median(values) if values else 0.0
    record = common.make_record("step_split", offline.model_label(args, llm), vars(args))
    record["startup"] = {"load_s": load_s}
    metrics = dict(phases)
    p = phases
    host = (p["step_ms"] - p["forward_ms"] - p["compute_logits_ms"])
    metrics["host_ms"] = host  # everything in the step but the forward and the LM head
    metrics["decode_tok_s"] = 1e3 * args.batch_size / p["step_ms"] if p["step_ms"] else 0.0
    if args.profile_steps > 0:
        split = _forward_aten_split(engine, args.batch_size, args.input_len, args.profile_steps,
                                    vocab)
        metrics.update(split)
    if last_outputs:
        metrics.update(_encode_and_detok_ms(llm, last_outputs))
    record["metrics"] = metrics
    llm.close()
    return common.finish(record, args.output_json, print_report)


def print_report(record: dict[str, Any]) -> None:
    cfg, m = record["config"], record["metrics"]
    rows = [(k, f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in m.items()]
    rows.append(("load_s (start-up, compile included)", f"{record['startup']['load_s']:.1f}"))
    common.print_table(rows, ["metric", "median"],
                       f"decode step split: {record['model']} | batch {cfg['batch_size']}, "
                       f"dtype {cfg['dtype']}, eager {cfg['enforce_eager']}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fornax.perf.step_split", description=__doc__)
    p.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-enforce-eager: torch.compile the forward (CPU too)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=200, help="decode steps timed")
    p.add_argument("--warmup", type=int, default=32, help="decode steps run before timing")
    p.add_argument("--profile-steps", type=int, default=32,
                   help="decode steps under torch.profiler for the ATen/Python split (0: skip)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time phases by this thread's CPU time (for a busy machine, with "
                        "OMP_NUM_THREADS=1)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if min(args.batch_size, args.input_len, args.steps) < 1 or args.warmup < 0:
        p.error("--batch-size, --input-len and --steps must be >= 1, --warmup >= 0")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    run(args)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
