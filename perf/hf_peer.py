"""Peer runner: HF transformers `generate` on the same weights, dtype and threads (CLI process)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fornax.perf.common import progress, summarize
from fornax.perf.datasets import BenchRequest

logger = logging.getLogger(__name__)


@dataclass
class HFRun:
    """One `generate` call: wall time, per-step timestamps, the work it did."""

    start: float
    elapsed_s: float
    cpu_s: float = 0.0  # process CPU time (all threads)
    step_times: list[float] = field(default_factory=list)  # perf_counter at each logits call
    batch_size: int = 0
    padded_prompt_len: int = 0
    new_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        return self.step_times[0] - self.start if self.step_times else self.elapsed_s

    @property
    def decode_step_ms(self) -> list[float]:
        return [1e3 * (b - a) for a, b in zip(self.step_times, self.step_times[1:])]


class _StepClock:
    """A no-op logits processor that records when each generation step produced logits."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.times.append(time.perf_counter())
        return scores


class HFPeer:
    """`AutoModelForCausalLM` over the folder fornax loaded (random init for `--load-format dummy`)."""

    def __init__(self, model_dir: str | Path, dtype: str, *, random_weights: bool, seed: int,
                 pad_token_id: int | None = None, eos_token_id: int | None = None,
                 device: str = "cpu") -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch_dtype = getattr(torch, dtype)
        start = time.perf_counter()
        if random_weights:
            torch.manual_seed(seed)
            config = AutoConfig.from_pretrained(str(model_dir))
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch_dtype, output_loading_info=True)
            self.model, info = loaded
            missing = sorted(info.get("missing_keys") or [])
            if missing:  # transformers only warns, then times a randomly initialized model
                raise RuntimeError(f"HF peer: {model_dir} lacks {len(missing)} weights HF "
                                   f"needs (e.g. {missing[0]}); not a checkpoint HF can run")
        self.model.eval()
        self.device = device
        if device != "cpu":
            self.model.to(device)
        self.load_s = time.perf_counter() - start
        cfg = self.model.config
        eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, list) else eos
        pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.dtype = dtype
        self.attn_implementation = getattr(cfg, "_attn_implementation", None)
        logger.info("HF peer: %s (%s, attention %s) loaded in %.2f s", type(self.model).__name__,
                    dtype, self.attn_implementation, self.load_s)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> HFRun:
        """Left-padded batched greedy generate of exactly `new_tokens` tokens per prompt."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        gen_config = GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, use_cache=True)
        clock = _StepClock()
        with torch.inference_mode():
            cpu_start = time.process_time()
            start = time.perf_counter()
            if self.device != "cpu":
                ids, mask = ids.to(self.device), mask.to(self.device)
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      generation_config=gen_config,
                                      logits_processor=LogitsProcessorList([clock]))
            if self.device != "cpu":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            cpu_s = time.process_time() - cpu_start
        produced = out.shape[1] - width
        if produced != new_tokens:
            logger.warning("HF generate produced %d new tokens, expected %d", produced, new_tokens)
        return HFRun(start=start, elapsed_s=elapsed, cpu_s=cpu_s, step_times=clock.times,
                     batch_size=len(prompts), padded_prompt_len=width, new_tokens=produced)

    def warm_up(self, prompts: list[list[int]], new_tokens: int) -> float:
        return self.generate(prompts, new_tokens).elapsed_s

    def throughput(self, requests: list[BenchRequest], prompts: list[list[int]],
                   batch_size: int | None, show_progress: bool) -> dict[str, Any]:
        """Static batches (sorted by output length, the peer's best case); each batch generates its
        longest output length for every row. Throughput counts the requested tokens (the same work
        fornax does); `generated_*` counts what HF actually computed, padding included."""
        order = sorted(range(len(requests)), key=lambda i: -requests[i].output_len)
        size = batch_size or len(requests)
        bar = progress(len(requests), "hf generate", show_progress)
        runs: list[HFRun] = []
        for lo in range(0, len(order), size):
            idx = order[lo:lo + size]
            runs.append(self.generate([prompts[i] for i in idx],
                                      max(requests[i].output_len for i in idx)))
            bar.update(len(idx))
        bar.close()
        elapsed = sum(r.elapsed_s for r in runs)
        cpu_s = sum(r.cpu_s for r in runs)
        useful_out = sum(r.output_len for r in requests)
        useful_in = sum(len(p) for p in prompts)
        generated = sum(r.batch_size * r.new_tokens for r in runs)
        decode_ms = [ms for r in runs for ms in r.decode_step_ms]
        metrics = {
            "elapsed_s": elapsed,
            "requests_per_s": len(requests) / elapsed,
            "output_throughput": useful_out / elapsed,
            "total_token_throughput": (useful_in + useful_out) / elapsed,
            "cpu_s": cpu_s,
            "output_throughput_cpu": useful_out / cpu_s if cpu_s else 0.0,
            "generated_tokens": generated,
            "generated_throughput": generated / elapsed,
            "padded_prompt_tokens": sum(r.batch_size * r.padded_prompt_len for r in runs),
            "num_batches": len(runs),
        }
        metrics.update(summarize(decode_ms, "decode_step", "ms"))
        return metrics
