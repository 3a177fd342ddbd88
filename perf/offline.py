"""Offline-engine helpers shared by `bench throughput` and `bench latency`: build, warm, time (CLI process)."""

from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from fornax.perf.datasets import BenchRequest

logger = logging.getLogger(__name__)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags both offline benchmarks share (vLLM's names)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    g.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"))
    g.add_argument("--seed", type=int, default=0, help="seeds the engine and the workload")
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch intra-op threads (default: OMP_NUM_THREADS / torch's default)")
    g.add_argument("--peer", choices=("none", "hf"), default="none",
                   help="also run HF transformers `generate` on the same weights, side by side")
    g.add_argument("--hf-batch-size", type=int, default=None,
                   help="peer hf: prompts per generate call (default: all of them at once)")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": args.dtype, "load_format": args.load_format,
                              "seed": args.seed,
                              "enable_prefix_caching": args.enable_prefix_caching}
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def set_threads(num_threads: int | None) -> None:
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)


def build_llm(args: argparse.Namespace) -> tuple[Any, float]:
    """(LLM, seconds to build it): the start-up cost, reported apart from the timed work."""
    from fornax.runtime import LLM

    start = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(args))
    return llm, time.perf_counter() - start


def model_label(args: argparse.Namespace, llm: Any) -> str:
    """What the JSON calls the model: the path given, or the packaged default's file name."""
    if args.model:
        return str(args.model)
    source = getattr(llm.engine.files, "source", "") or str(llm.engine.files.path)
    return source.rsplit("/", 1)[-1]


def greedy_params(max_tokens: int) -> Any:
    from fornax.runtime import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def warm_up(llm: Any, vocab_upper: int, *, batch: int, input_len: int, output_len: int,
            seed: int) -> float:
    """One short generate on throw-away prompts (never the measured ones: the prefix cache would
    remember them). Returns its wall time, reported as start-up cost."""
    rng = random.Random(seed ^ 0xBADC0DE)
    special = set(getattr(llm.tokenizer, "special_ids", {}).values())
    prompts = []
    for _ in range(max(batch, 1)):
        ids: list[int] = []
        while len(ids) < max(input_len, 1):
            tid = rng.randrange(vocab_upper)
            if tid not in special:
                ids.append(tid)
        prompts.append({"prompt_token_ids": ids})
    start = time.perf_counter()
    llm.generate(prompts, greedy_params(max(output_len, 1)), use_tqdm=False)
    return time.perf_counter() - start


def hf_peer(llm: Any, args: argparse.Namespace) -> Any:
    """HF transformers on the engine's checkpoint and dtype (random weights when the engine's are
    dummy), stopping at the engine's first EOS id: the `--peer hf` side of the offline benches."""
    from fornax.perf.hf_peer import HFPeer

    eos = sorted(llm.engine.info.eos_token_ids)
    files = llm.engine.files
    model_dir = files.path
    if str(files.source).endswith(".gguf"):
        # the engine's folder keeps GGUF weights quantized (fornax QuantWeights), which HF cannot
        # read: it would silently initialize every layer at random. HF gets the dequantized one.
        from fornax.runtime.loaders.gguf_loader import prepare_gguf

        model_dir = prepare_gguf(files.source)
    return HFPeer(model_dir, llm.engine.info.dtype,
                  random_weights=args.load_format == "dummy", seed=args.seed,
                  eos_token_id=eos[0] if eos else None)


def vocab_upper(llm: Any) -> int:
    """Largest usable token id + 1: the tokenizer's size, capped by the model's vocab."""
    tok = getattr(llm.tokenizer, "vocab_size", None) or llm.engine.info.vocab_size
    return min(int(tok), int(llm.engine.info.vocab_size))


def remap_ids(requests: list[BenchRequest], shift: int, upper: int,
              avoid: set[int]) -> list[list[int]]:
    """Same lengths and shared-prefix structure, different ids: repeat `shift` cannot hit the
    prefix cache filled by earlier repeats."""
    out = []
    for req in requests:
        ids = []
        for tid in req.prompt_token_ids or []:
            new = (tid + shift * 7919) % upper
            while new in avoid:
                new = (new + 1) % upper
            ids.append(new)
        out.append(ids)
    return out


@dataclass
class StepRecord:
    start: float
    end: float
    num_outputs: int
    num_tokens: int
    num_first_tokens: int  # requests whose first token came from this step (a prefill finished)


@dataclass
class StepTimer:
    """Wraps an EngineCore: times every `step()` and notes when each request got its first token.

    Installed as `llm.engine` for the measured region only; everything else is delegated."""

    engine: Any
    steps: list[StepRecord] = field(default_factory=list)
    first_token_at: dict[str, float] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0  # CPU time of this process (all threads) over the measured region

    def step(self) -> Any:
        start = time.perf_counter()
        outputs = self.engine.step()
        end = time.perf_counter()
        tokens = firsts = 0
        for out in outputs:
            if out.new_token_ids:
                tokens += len(out.new_token_ids)
                if out.request_id not in self.first_token_at:
                    self.first_token_at[out.request_id] = end
                    firsts += 1
            if out.finish_reason is not None:
                self.finished_at[out.request_id] = end
        if outputs:
            self.steps.append(StepRecord(start, end, len(outputs), tokens, firsts))
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def timed_generate(llm: Any, prompts: list[list[int]], max_tokens: list[int],
                   use_tqdm: bool) -> tuple[list[Any], float, StepTimer, float]:
    """Run one measured `llm.generate`: (outputs, elapsed s, step timer, start time).

    `timer.cpu_s` is the process CPU time of the region: on a shared, oversubscribed machine
    tokens per CPU-second moves far less than tokens per wall-second."""
    timer = StepTimer(llm.engine)
    params = [greedy_params(m) for m in max_tokens]
    inputs = [{"prompt_token_ids": ids} for ids in prompts]
    llm.engine = timer
    try:
        cpu_start = time.process_time()
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=use_tqdm)
        elapsed = time.perf_counter() - start
        timer.cpu_s = time.process_time() - cpu_start
    finally:
        llm.engine = timer.engine
    return outputs, elapsed, timer, start


def step_summary(timer: StepTimer) -> dict[str, Any]:
    """Per-step numbers; a decode step is one in which no request got its first token."""
    from fornax.perf.common import summarize

    decode_ms = [1e3 * (s.end - s.start) for s in timer.steps if s.num_first_tokens == 0]
    out: dict[str, Any] = {"num_steps": len(timer.steps),
                           "step_time_total_s": sum(s.end - s.start for s in timer.steps)}
    out.update(summarize(decode_ms, "decode_step", "ms"))
    return out
