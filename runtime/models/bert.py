"""BERT-family encoders (BERT, RoBERTa, XLM-R) over flat varlen batches, and heads (engine core).

Same math as HF transformers' `BertModel` / `*ForSequenceClassification` in eval mode, with Q, K
and V fused into one matmul and no padding in the linear layers: tokens of all sequences of a step
are laid out back to back, and only attention sees the (per-sequence) padded layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fornax.runtime.errors import ConfigError
from fornax.runtime.loaders.weights import Place, Renames, rename
from fornax.runtime.models.layers import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from fornax.runtime.pooling.attention import VarlenMetadata, varlen_attention

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
_QKV: Renames = (("attention.self.query.", "attention.qkv_proj.", "q"),
        ("attention.self.key.", "attention.qkv_proj.", "k"),
        ("attention.self.value.", "attention.qkv_proj.", "v"))


class EncoderSpec:
    """The config.json values an encoder needs, checked once."""

    def __init__(self, cfg: dict[str, Any], arch: str) -> None:
        try:
            self.vocab_size = int(cfg["vocab_size"])
            self.hidden_size = int(cfg["hidden_size"])
            self.num_layers = int(cfg["num_hidden_layers"])
            self.num_heads = int(cfg["num_attention_heads"])
            self.intermediate_size = int(cfg["intermediate_size"])
            self.max_position = int(cfg.get("max_position_embeddings", 512))
            self.type_vocab_size = int(cfg.get("type_vocab_size", 2))
            self.eps = float(cfg.get("layer_norm_eps", 1e-12))
            self.act = str(cfg.get("hidden_act", "gelu"))
            self.pad_token_id = int(cfg.get("pad_token_id") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config.json is missing or has a bad value for {exc}") from exc
        if self.act not in _ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {self.act!r} for {arch}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"{arch}: only absolute position embeddings are supported, got "
                              f"{cfg.get('position_embedding_type')!r}")
        self.is_roberta = "Roberta" in arch
        # RoBERTa numbers positions from padding_idx + 1 (HF's create_position_ids_from_input_ids)
        self.position_offset = self.pad_token_id + 1 if self.is_roberta else 0
        self.head_dim = self.hidden_size // self.num_heads
        num_labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2
        self.num_labels = int(num_labels)


class EncoderEmbeddings(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.position_embeddings = VocabParallelEmbedding(spec.max_position, spec.hidden_size)
        self.token_type_embeddings = VocabParallelEmbedding(spec.type_vocab_size, spec.hidden_size)
        self.LayerNorm = nn.LayerNorm(spec.hidden_size, eps=spec.eps)
        self.position_offset = spec.position_offset
        self.single_type = spec.type_vocab_size == 1

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.single_type:  # RoBERTa: one segment type; pair separators carry no type ids
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(x)


class _DenseNorm(nn.Module):
    """dense -> (dropout) -> LayerNorm(x + residual): BertSelfOutput and BertOutput."""

    def __init__(self, in_size: int, spec: EncoderSpec) -> None:
        super().__init__()
        self.dense = RowParallelLinear(in_size, spec.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(spec.hidden_size, eps=spec.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Dense(nn.Module):
    """A checkpoint level holding one `dense` linear (BertIntermediate, BertPooler)."""

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(in_size, out_size, bias=True)


class _RobertaHead(nn.Module):
    """RobertaClassificationHead: dense -> tanh -> out_proj."""

    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(hidden, hidden, bias=True)
        self.out_proj = ColumnParallelLinear(hidden, num_labels, bias=True)


class _LayerStack(nn.Module):
    """The checkpoint's `encoder.layer.<i>` level."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.num_layers))


class EncoderAttention(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_heads, bias=True)
        self.output = _DenseNorm(spec.hidden_size, spec)
        self.scale = 1.0 / math.sqrt(spec.head_dim)

    def forward(self, x: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        out = varlen_attention(q, k, v, meta, self.scale)
        return self.output(out.reshape(-1, self.num_heads * self.head_dim), x)


class EncoderLayer(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.attention = EncoderAttention(spec)
        self.intermediate = _Dense(spec.hidden_size, spec.intermediate_size)
        self.output = _DenseNorm(spec.intermediate_size, spec)
        self.act = _ACTIVATIONS[spec.act]

    def forward(self, x: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.act(self.intermediate.dense(x)), x)


class EncoderModel(nn.Module):
    """Embeddings and the transformer stack: flat tokens -> last hidden states [T, hidden]."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.embeddings = EncoderEmbeddings(spec)
        self.encoder = _LayerStack(spec)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x


class EncoderForPooling(nn.Module):
    """`BertModel` / `RobertaModel` / `*ForSequenceClassification` behind one interface:
    `forward` gives hidden states, `classify` the logits from the first token's hidden state."""

    def __init__(self, hf_config: dict[str, Any], arch: str) -> None:
        super().__init__()
        self.spec = spec = EncoderSpec(hf_config, arch)
        self.arch = arch
        self.has_classifier = arch.endswith("ForSequenceClassification")
        self.model = EncoderModel(spec)
        if self.has_classifier:
            h = spec.hidden_size
            self.classifier: _RobertaHead | ColumnParallelLinear
            if spec.is_roberta:
                self.classifier = _RobertaHead(h, spec.num_labels)
            else:  # BertPooler (dense -> tanh) then the classifier
                self.pooler = _Dense(h, h)
                self.classifier = ColumnParallelLinear(h, spec.num_labels, bias=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, token_type_ids, meta)

    def classify(self, first_hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] (each sequence's first token) -> [B, num_labels] logits."""
        if isinstance(self.classifier, _RobertaHead):
            return self.classifier.out_proj(torch.tanh(self.classifier.dense(first_hidden)))
        return self.classifier(torch.tanh(self.pooler.dense(first_hidden)))

    def checkpoint_name(self, name: str) -> Place | None:
        """An HF checkpoint tensor's parameter and shard (None: not loaded; see loaders.weights)."""
        if name.endswith((".position_ids", ".token_type_ids")) or "rotary" in name:
            return None
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias")
        for prefix in ("bert.", "roberta.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.startswith(("pooler.", "classifier.")):
            if not self.has_classifier or (name.startswith("pooler.") and self.spec.is_roberta):
                return None  # BertModel's pooler is unused for embeddings
            return name, None
        if name.startswith(("lm_head.", "cls.")):
            return None  # masked-LM heads ride along in some checkpoints
        return rename("model." + name, _QKV)
