"""PoolingModelRunner: loads an encoder or decoder embedder, pools a step's sequences (engine core).

A step is a list of whole prompts. Their tokens go through the model back to back in one forward
(no KV cache is kept), then each sequence is pooled (CLS / MEAN / MAX / LAST / MEAN_SQRT_LEN),
optionally truncated (Matryoshka) and L2-normalized, or sent through the classifier head.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from fornax.runtime.config import EngineConfig
from fornax.runtime.engine.messages import PoolingModelInfo, PoolingOutput
from fornax.runtime.loaders.model_files import ModelFiles
from fornax.runtime.loaders.weights import load_model_weights, resolve_dtype
from fornax.runtime.models.registry import POOLING_MODELS, model_class
from fornax.runtime.pooling.attention import build_varlen_metadata
from fornax.runtime.pooling.core import PoolingRequest

logger = logging.getLogger(__name__)


class PoolingModelRunner:
    """Owns the pooling model; `execute` runs one step and returns one output per item."""

    def __init__(self, config: EngineConfig, files: ModelFiles, info: PoolingModelInfo) -> None:
        self.config = config
        self.info = info
        self.device = torch.device(config.device)
        hf = files.hf_config
        self.dtype = resolve_dtype(config.model_config.dtype, hf, self.device)
        self.causal = info.family == "decoder"
        start = time.perf_counter()
        torch.manual_seed(config.model_config.seed)
        model_cls = model_class(POOLING_MODELS[info.family])  # runtime/models/registry.py
        with torch.device(self.device):
            model = model_cls(hf, info.architecture)
        self.model = model.to(self.dtype).eval()
        load_model_weights(self.model, self.model.checkpoint_name, files, config.model_config,
                           info.architecture)
        self.vocab_size = int(hf["vocab_size"])
        self.num_labels = len(info.labels)
        how = (f"{info.pooling_type} pooling{', normalized' if info.normalize else ''}"
               if info.head == "embed" else f"classifier, {len(info.labels)} labels")
        logger.info("loaded %s for pooling (%s, %s, %s) in %.2f s", files.source or files.path,
                    info.architecture, str(self.dtype).removeprefix("torch."), how,
                    time.perf_counter() - start)

    # ---- one step ------------------------------------------------------------------------------
    def execute(self, items: list[PoolingRequest]) -> list[PoolingOutput]:
        """One output per item, in the items' order."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].token_ids))
        outs = self._execute_sorted([items[i] for i in order])
        result: list[PoolingOutput] = [None] * len(items)  # type: ignore[list-item]
        for pos, i in enumerate(order):
            result[i] = outs[pos]
        return result

    @torch.inference_mode()
    def _execute_sorted(self, items: list[PoolingRequest]) -> list[PoolingOutput]:
        """Items sorted by length: equal-length runs attend as one [n, L] batch without padding."""
        seq_lens = np.fromiter((len(it.token_ids) for it in items), dtype=np.int64,
                               count=len(items))
        num_tokens = int(seq_lens.sum())
        starts = np.zeros(len(items), dtype=np.int64)
        np.cumsum(seq_lens[:-1], out=starts[1:])
        ids_np = np.fromiter((t for it in items for t in it.token_ids), dtype=np.int64,
                             count=num_tokens)
        seq_of_token = np.repeat(np.arange(len(items), dtype=np.int64), seq_lens)
        pos_np = np.arange(num_tokens, dtype=np.int64) - starts[seq_of_token]
        types_np = np.zeros(num_tokens, dtype=np.int64)
        for it, start in zip(items, starts):
            if it.token_type_ids:
                types_np[start:start + len(it.token_type_ids)] = it.token_type_ids
        dev = self.device
        meta = build_varlen_metadata(seq_lens, self.causal)
        hidden = self.model(torch.from_numpy(ids_np).to(dev), torch.from_numpy(pos_np).to(dev),
                            torch.from_numpy(types_np).to(dev), meta)  # [T, hidden]
        if self.model.has_classifier:
            first = hidden[torch.from_numpy(starts).to(dev)]
            return self._classify(items, self.model.classify(first).float())
        pooled = self._pool(hidden.float(), seq_lens, starts, seq_of_token)
        return self._embed(items, pooled)

    def _pool(self, hidden: torch.Tensor, seq_lens: np.ndarray, starts: np.ndarray,
              seq_of_token: np.ndarray) -> torch.Tensor:
        """[T, H] -> [B, H] by the model's pooling type."""
        kind, dev = self.info.pooling_type, hidden.device
        if kind == "CLS":
            return hidden[torch.from_numpy(starts).to(dev)]
        if kind == "LAST":
            return hidden[torch.from_numpy(starts + seq_lens - 1).to(dev)]
        seg = torch.from_numpy(seq_of_token).to(dev)
        b, h = len(seq_lens), hidden.shape[1]
        if kind == "MAX":
            out = torch.full((b, h), float("-inf"), dtype=hidden.dtype, device=dev)
            return out.scatter_reduce_(0, seg[:, None].expand(-1, h), hidden, "amax")
        sums = torch.zeros(b, h, dtype=hidden.dtype, device=dev).index_add_(0, seg, hidden)
        lens = torch.from_numpy(seq_lens).to(dev, hidden.dtype)[:, None]
        return sums / (lens.sqrt() if kind == "MEAN_SQRT_LEN" else lens)

    def _embed(self, items: list[PoolingRequest], pooled: torch.Tensor) -> list[PoolingOutput]:
        default_norm = self.info.normalize
        norms = [default_norm if it.params.normalize is None else it.params.normalize
                 for it in items]
        dims = [it.params.dimensions for it in items]
        if all(d is None for d in dims) and all(n == norms[0] for n in norms):
            if norms[0]:
                pooled = F.normalize(pooled, p=2, dim=-1)
            rows = pooled.cpu().numpy()
            shape = [rows.shape[1]]
            return [PoolingOutput(rows[i].tobytes(), shape) for i in range(len(items))]
        outs = []
        for i, (dim, norm) in enumerate(zip(dims, norms)):
            row = pooled[i, :dim] if dim is not None else pooled[i]
            if norm:
                row = F.normalize(row, p=2, dim=-1)
            arr = row.cpu().numpy()
            outs.append(PoolingOutput(arr.tobytes(), [arr.shape[0]]))
        return outs

    def _classify(self, items: list[PoolingRequest], logits: torch.Tensor) -> list[PoolingOutput]:
        """[B, num_labels] logits -> probabilities (sigmoid for one label, else softmax)."""
        if logits.shape[1] == 1:
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        probs_np, logits_np = probs.cpu().numpy(), logits.cpu().numpy()
        shape = [logits_np.shape[1]]
        return [PoolingOutput((probs_np[i] if it.params.activation else logits_np[i]).tobytes(),
                              shape) for i, it in enumerate(items)]
