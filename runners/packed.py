"""Padding-free forward passes: Qwen3 decoders (Qwen3-Embedding, Qwen3-Reranker, Qwen3-4B) and BERT encoders.

A micro-batch is one packed row of tokens, [total_tokens, hidden], with cumulative sequence
offsets `cu_seqlens` marking where each text starts. Every matmul then works on real tokens only
(no padding, whatever the length mix), and attention runs per sequence: on a GPU torch's own flash
attention over packed sequences (`torch.nn.attention.varlen.varlen_attn`, causal for Qwen3,
bidirectional for BERT); on the CPU a causal scaled-dot-product loop for Qwen3, and for BERT one
masked scaled-dot-product call over the batch padded for attention only.

The weights are the Hugging Face model's own modules, used as they are (bitsandbytes layers
included); only the glue between them is rewritten. tests/test_packed.py proves the result equals
Hugging Face's own forward.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .fp8 import Fp8Linear, Fp8Weight, fp8_linear
from .int8 import Int8Linear, Int8Weight, int8_linear

log = logging.getLogger(__name__)


def supports_packing(model: Any) -> bool:
    """Qwen3 decoders without sliding-window layers: the architecture this forward reproduces."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) == "qwen3"
        and not getattr(config, "use_sliding_window", False)
        and hasattr(model, "layers")
        and hasattr(model, "rotary_emb")
    )


def supports_bert_packing(model: Any) -> bool:
    """BERT encoders with absolute positions (BGE, MiniLM): the architecture PackedBert reproduces."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) == "bert"
        and not getattr(config, "is_decoder", False)
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and hasattr(model, "embeddings")
        and hasattr(model, "encoder")
    )


def packed_forward_for(model: Any, config: Any, device: torch.device) -> PackedQwen3 | PackedBert | None:
    """The padding-free forward for this model, when its architecture has one and EMBED_PACKED allows it."""
    if not config.packed:
        return None
    if supports_packing(model):
        return PackedQwen3(model, compile=config.compiles_on(device))
    if supports_bert_packing(model):
        return PackedBert(model, compile=config.compiles_on(device))
    return None


def keep_rows(
    rows: str, cu_seqlens: torch.Tensor, out: torch.Tensor, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Before the final layer's MLP: keep the one row per text that a pooling reads ("first" or "last") of
    the attention output and the residual, and cu_seqlens that says so (0, 1, ..., n); "all" keeps all."""
    if rows == "all":
        return cu_seqlens, out, hidden
    kept = cu_seqlens[:-1].long() if rows == "first" else cu_seqlens[1:].long() - 1
    one_each = torch.arange(len(kept) + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return one_each, out[kept], hidden[kept]


def right_padded(
    batch: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [n, longest], padded on the right: real tokens keep positions 0..len-1."""
    longest = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids.to(device), mask.to(device)


def pooled_final_hidden(
    model: Any,
    packed: PackedQwen3 | PackedBert | None,
    pooling: Any,
    batch: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Each sequence's final hidden states, pooled (a runners.pooling rule): through the padding-free forward
    when there is one, else right-padded through the model's own. Also the positions computed, for the
    padding metric (packed: the real tokens alone)."""
    if packed is not None:
        hidden, cu_seqlens = packed.forward(batch, rows=pooling.reads)
        return pooling.packed(hidden, cu_seqlens), sum(len(ids) for ids in batch)
    input_ids, mask = right_padded(batch, pad_id, device)
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return pooling(hidden, mask), input_ids.numel()


def pack(token_ids: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T], positions [T] (0..n-1 within each text) and cu_seqlens [n+1] (int32)."""
    lengths = torch.tensor([len(ids) for ids in token_ids])
    ids = torch.tensor([token for sequence in token_ids for token in sequence])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    positions = torch.arange(len(ids)) - starts
    return ids.to(device), positions.to(device), cu_seqlens.to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedQwen3:
    """forward(token_ids) -> last-layer hidden states [T, hidden] of a packed micro-batch.

    With plain bf16/fp32 linear layers, each decoder layer runs as two functions of its weights
    (everything before attention, everything after it), which `torch.compile` can fuse: the norms,
    rotary embedding, SwiGLU and residual adds then cost one memory pass each instead of several.
    FP8 and weight-only int8 layers go through the same functions; bitsandbytes layers run as their own modules instead.
    """

    def __init__(self, model: Any, *, compile: bool = False) -> None:
        if not supports_packing(model):
            raise ValueError("PackedQwen3 needs a Qwen3 decoder (Qwen3Model) without sliding-window layers")
        self.model = model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.eps = float(config.rms_norm_eps)
        self._varlen = _varlen_attention()
        self.functional = config.hidden_act == "silu" and all(_plain_linear(layer) for layer in model.layers)
        self._inputs, self._outputs = _attention_inputs, _attention_output_and_mlp
        self.compiled = compile and self.functional
        if self.compiled:
            self._inputs = torch.compile(_attention_inputs, dynamic=True)
            self._outputs = torch.compile(_attention_output_and_mlp, dynamic=True)
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile now, at start-up, not on the first request; a compiler that fails means eager, not a crash.
        torch.compile specializes sizes of one, so single-text batches are warmed up as well as larger ones."""
        try:
            for rows in ("all", "last"):  # both ways the final layer runs
                self.forward([[1, 2, 3], [4, 5]], rows=rows)
                self.forward([[1, 2, 3]], rows=rows)  # one text: its own specialization
        except Exception as exc:  # torch.compile raises many kinds of errors
            log.warning("torch.compile failed (%s: %s); running the packed layers eagerly", type(exc).__name__, exc)
            self._inputs, self._outputs, self.compiled = _attention_inputs, _attention_output_and_mlp, False

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[Sequence[int]], *, rows: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden [T, hidden], cu_seqlens [n+1]).

        rows="first" or "last": the caller reads one position of each text only (a pooling's `reads`;
        reranking reads the last), so the final layer's output projection and MLP run on those n rows,
        not all T; hidden is then [n, hidden], one row per text, and cu_seqlens says so (0, 1, ..., n).
        """
        model = self.model
        device = model.embed_tokens.weight.device
        ids, positions, cu_seqlens = pack(token_ids, device)
        longest = max(len(sequence) for sequence in token_ids)
        hidden = model.embed_tokens(ids)
        cos, sin = model.rotary_emb(hidden, positions.unsqueeze(0))  # [1, T, head_dim]
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, head_dim]: broadcast over heads
        tokens = hidden.shape[0]
        final = len(model.layers) - 1
        for index, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if self.functional:
                q, k, v = self._inputs(
                    hidden, layer.input_layernorm.weight, _weight(attn.q_proj), _weight(attn.k_proj),
                    _weight(attn.v_proj), attn.q_norm.weight, attn.k_norm.weight, cos, sin, self.eps,
                    self.heads, self.kv_heads, self.head_dim,
                )  # fmt: skip
            else:
                x = layer.input_layernorm(hidden)
                q = attn.q_norm(attn.q_proj(x).view(tokens, self.heads, self.head_dim))
                k = attn.k_norm(attn.k_proj(x).view(tokens, self.kv_heads, self.head_dim))
                v = attn.v_proj(x).view(tokens, self.kv_heads, self.head_dim)
                q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            out = self._attend(q, k, v, cu_seqlens, longest).reshape(tokens, -1)
            if index == final:
                cu_seqlens, out, hidden = keep_rows(rows, cu_seqlens, out, hidden)
            if self.functional:
                hidden = self._outputs(
                    out, hidden, _weight(attn.o_proj), layer.post_attention_layernorm.weight, _weight(mlp.gate_proj),
                    _weight(mlp.up_proj), _weight(mlp.down_proj), self.eps,
                )  # fmt: skip
            else:
                hidden = hidden + attn.o_proj(out)
                hidden = hidden + mlp(layer.post_attention_layernorm(hidden))
        return model.norm(hidden), cu_seqlens

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int
    ) -> torch.Tensor:
        # Flash attention takes half precision only (fp32 on GPUs without bf16 takes the SDPA loop).
        if self._varlen is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            return self._varlen(q, k, v, cu_seqlens, longest, self.heads // self.kv_heads, self.scale)
        return _causal_attention_per_sequence(q, k, v, cu_seqlens, self.scale)


class PackedBert:
    """forward(token_ids) -> last-layer hidden states [T, hidden] of a packed micro-batch, for BERT encoders.

    The model's own modules do the work (embeddings with positions restarting at each text, the
    linear layers, LayerNorms and GELU on the packed tokens); only self-attention is rewritten. On a GPU in
    bf16/fp16 it is torch's flash attention over the packed sequences (bidirectional); elsewhere the packed
    q/k/v are laid out [texts, longest, hidden] for one masked SDPA call and packed again. With compile, the
    code between the matmuls (bias, GELU, residual, LayerNorm) is fused by torch.compile.
    """

    def __init__(self, model: Any, *, compile: bool = False) -> None:
        if not supports_bert_packing(model):
            raise ValueError("PackedBert needs a BERT encoder with absolute position embeddings")
        self.model = model
        self.heads = model.config.num_attention_heads
        self.head_dim = model.config.hidden_size // self.heads
        self._varlen = _varlen_attention()
        self._after_attention = _bert_after_attention
        self.compiled = compile
        if compile:
            self._after_attention = torch.compile(_bert_after_attention, dynamic=True)
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile at start-up, as PackedQwen3 does; a compiler that fails means eager, not a crash."""
        try:
            for rows in ("all", "first"):
                self.forward([[1, 2, 3], [4, 5]], rows=rows)
                self.forward([[1, 2, 3]], rows=rows)
        except Exception as exc:  # torch.compile raises many kinds of errors
            log.warning("torch.compile failed (%s: %s); running the packed layers eagerly", type(exc).__name__, exc)
            self._after_attention, self.compiled = _bert_after_attention, False

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[Sequence[int]], *, rows: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden [T, hidden], cu_seqlens [n+1]); rows as in PackedQwen3.forward."""
        model = self.model
        device = model.embeddings.word_embeddings.weight.device
        ids, positions, cu_seqlens = pack(token_ids, device)
        hidden = model.embeddings(
            input_ids=ids[None], position_ids=positions[None], token_type_ids=torch.zeros_like(ids)[None]
        )[0]
        longest = max(len(sequence) for sequence in token_ids)
        flash = self._varlen is not None and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)
        layout = None if flash else _attention_layout(cu_seqlens, longest)
        final = len(model.encoder.layer) - 1
        for index, layer in enumerate(model.encoder.layer):
            attention = layer.attention.self
            if layout is None:
                out = self._attend_flash(attention, hidden, cu_seqlens, longest)
            else:
                out = self._attend_padded(attention, hidden, *layout)
            if index == final:
                cu_seqlens, out, hidden = keep_rows(rows, cu_seqlens, out, hidden)
            hidden = self._after_attention(out, hidden, layer)
        return hidden, cu_seqlens

    def _attend_flash(
        self, attention: Any, hidden: torch.Tensor, cu_seqlens: torch.Tensor, longest: int
    ) -> torch.Tensor:
        tokens = hidden.shape[0]

        def heads(linear: Any) -> torch.Tensor:  # packed [T, hidden] -> [T, heads, head_dim]
            return linear(hidden).view(tokens, self.heads, self.head_dim)

        q, k, v = heads(attention.query), heads(attention.key), heads(attention.value)
        assert self._varlen is not None
        out = self._varlen(q, k, v, cu_seqlens, longest, 1, attention.scaling, causal=False)
        return out.reshape(tokens, -1)

    def _attend_padded(
        self, attention: Any, hidden: torch.Tensor, layout: torch.Tensor, key_mask: torch.Tensor, real: torch.Tensor
    ) -> torch.Tensor:
        texts, longest = layout.shape

        def heads(linear: Any) -> torch.Tensor:  # packed [T, hidden] -> [texts, heads, longest, head_dim]
            return linear(hidden)[layout].view(texts, longest, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(attention.query), heads(attention.key), heads(attention.value)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=attention.scaling)
        return out.transpose(1, 2)[real].flatten(1)  # real positions only, in packed order: [T, hidden]


def _attention_layout(cu_seqlens: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each text's tokens sit in the [texts, longest] layout the padded attention uses, the keys' mask and
    the real positions. Padding positions repeat the text's first token: as keys they are masked out, as queries
    their outputs are dropped."""
    lengths = cu_seqlens.diff().long()
    offsets = torch.arange(longest, device=cu_seqlens.device)
    real = offsets[None, :] < lengths[:, None]  # [n, longest]
    starts = cu_seqlens[:-1, None].long()
    layout = torch.where(real, starts + offsets[None, :], starts)
    return layout, real[:, None, None, :], real


def _bert_after_attention(out: torch.Tensor, hidden: torch.Tensor, layer: Any) -> torch.Tensor:
    """A BERT layer after its attention: output dense, residual, LayerNorm; dense + GELU; dense, residual,
    LayerNorm (the model's own modules, which torch.compile can fuse around the matmuls)."""
    hidden = layer.attention.output(out, hidden)
    return layer.output(layer.intermediate(hidden), hidden)


# The swapped quantized layers (runners/fp8.py, runners/int8.py): their `quantized` weight, and its product.
_QUANTIZED_LINEARS = (Fp8Linear, Int8Linear)
_PRODUCTS = ((Fp8Weight, fp8_linear), (Int8Weight, int8_linear))


def _plain_linear(layer: Any) -> bool:
    """Linear layers whose weights the weight functions can take: bf16/fp32 nn.Linear, FP8 or int8, without bias."""
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]  # fmt: skip
    return all(type(linear) in (torch.nn.Linear, *_QUANTIZED_LINEARS) and linear.bias is None for linear in linears)


def _weight(linear: Any) -> torch.Tensor | Fp8Weight | Int8Weight:
    return linear.quantized if isinstance(linear, _QUANTIZED_LINEARS) else linear.weight


def _linear(x: torch.Tensor, weight: torch.Tensor | Fp8Weight | Int8Weight) -> torch.Tensor:
    for kind, product in _PRODUCTS:
        if isinstance(weight, kind):
            return product(x, weight)
    return F.linear(x, weight)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm: normalize in fp32, scale in the input dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _attention_inputs(hidden, norm_w, q_w, k_w, v_w, q_norm_w, k_norm_w, cos, sin, eps: float, heads: int,
                      kv_heads: int, head_dim: int):  # fmt: skip
    """input norm, q/k/v projections, per-head q/k norms, rotary embedding."""
    tokens = hidden.shape[0]
    x = _rms_norm(hidden, norm_w, eps)
    q = _rms_norm(_linear(x, q_w).view(tokens, heads, head_dim), q_norm_w, eps)
    k = _rms_norm(_linear(x, k_w).view(tokens, kv_heads, head_dim), k_norm_w, eps)
    v = _linear(x, v_w).view(tokens, kv_heads, head_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _attention_output_and_mlp(attn_out, residual, o_w, norm_w, gate_w, up_w, down_w, eps: float):
    """o projection and residual, post-attention norm, SwiGLU MLP and residual."""
    hidden = residual + _linear(attn_out, o_w)
    x = _rms_norm(hidden, norm_w, eps)
    return hidden + _linear(F.silu(_linear(x, gate_w)) * _linear(x, up_w), down_w)


def _causal_attention_per_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The CPU path: one causal SDPA call per text. q [T, H, D], k/v [T, Hkv, D]."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _varlen_attention():
    """torch's flash attention over packed sequences, when this torch has it (2.10+), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    takes_gqa = "enable_gqa" in parameters
    windowed = "window_size" in parameters  # 2.11+; 2.10 has is_causal instead

    def attend(q, k, v, cu_seqlens, longest, groups, scale, causal=True):
        if groups > 1 and not takes_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if groups > 1 and takes_gqa else {}
        if windowed:
            extra["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            extra["is_causal"] = causal
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scale, **extra)

    return attend
