"""Weight-only int8 (`<NAME>_QUANTIZATION=int8`): one byte per weight, activations in the model's dtype.

Each linear layer's weight is stored as int8 with two scale vectors: one per input column, then one per
output channel (symmetric absmax, round to nearest, |q| <= 127), weight ~= scale[:, None] * q *
column_scale[None, :]. A per-channel scale alone lets a few large input columns (FFN output layers have
them) set the step of their whole row; dividing each column by its spread first (a Sinkhorn-style
balancing of rows and columns, as in SINQ, arXiv 2509.22944, needing no calibration data) spends the 255
levels on the weights that are there. Both scales stay outside the integer product, so it keeps its
fused form: x * column_scale (one elementwise pass over the activations), the int8 product, * scale.
Inputs, accumulation and outputs stay in the model's dtype (bf16 on GPUs, fp32 on the CPU). Two ways to
run the product, chosen by device and dtype:
- `torch._weight_int8pack_mm`, one fused kernel, for bf16/fp16 on the CPU. Its fp32 CPU kernel is
  a matrix-vector loop, many times slower than fp32's own matmul on batches, so fp32 takes the other;
- `x @ int8.to(dtype).T * scale` elsewhere: one layer's weight converted at a time (never a
  dequantized copy of the model); on GPUs the compiled packed forward lets Inductor fuse it.

Hand-written rather than torchao's Int8WeightOnlyConfig (0.18): that is per-channel only and runs the
second expression everywhere, the CPU's bf16 included, and would be one more dependency for a few lines;
bench/quant_accuracy.py compares the two (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .quantized import QuantizedLinear, swap_linears

INT8_MAX = 127  # symmetric: -128 is never used, so that -w quantizes to -q
# Balancing rounds: two were the most accurate of 1-16 measured on MiniLM (BENCHMARKS.md); more rounds
# balance the matrix further but push the column scales to extremes that cost the outputs accuracy.
BALANCING_ROUNDS = 2


class Int8Weight(NamedTuple):
    data: torch.Tensor  # [out, in], int8
    scale: torch.Tensor  # [out], float32
    column_scale: torch.Tensor  # [in], float32: weight ~= scale[:, None] * data * column_scale[None, :]


def column_scales(w: torch.Tensor, rounds: int = BALANCING_ROUNDS) -> torch.Tensor:
    """Per-input-column factors that even out the spread (standard deviation) of w's rows and columns,
    alternately, `rounds` times; only the column factors are kept (absmax sets the row scales after)."""
    rows, columns = torch.ones(w.shape[0], 1, device=w.device), torch.ones(1, w.shape[1], device=w.device)
    for _ in range(rounds):
        rows = rows * (w / rows / columns).std(dim=1, correction=0, keepdim=True).clamp(min=1e-12)
        columns = columns * (w / rows / columns).std(dim=0, correction=0, keepdim=True).clamp(min=1e-12)
    return (columns / columns.mean()).squeeze(0)  # mean 1: x * column_scale keeps the activations' range


def quantize_weight(weight: torch.Tensor) -> Int8Weight:
    w = weight.float()
    column_scale = column_scales(w)
    balanced = w / column_scale
    scale = balanced.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    data = torch.round(balanced / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Weight(data, scale, column_scale)


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x @ dequantized(weight).T, the result in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    fused = rows.device.type == "cpu" and rows.dtype in (torch.bfloat16, torch.float16)
    out = (fused_cpu_product if fused else dequantizing_product)(rows, weight)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# Both products put the column scales on the activations, [tokens, in]: small for a single query (the
# memory-bound case), and fused by Inductor into the op that produces x in the compiled forward; folding them
# into the weight instead would add a pass over [out, in] per call.
def fused_cpu_product(rows: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    scaled = (rows * weight.column_scale.to(rows.dtype)).contiguous()
    return torch._weight_int8pack_mm(scaled, weight.data, weight.scale.to(rows.dtype))


def dequantizing_product(rows: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    scaled = rows * weight.column_scale.to(rows.dtype)
    return F.linear(scaled, weight.data.to(rows.dtype)) * weight.scale.to(rows.dtype)


class Int8Linear(QuantizedLinear):
    """A drop-in nn.Linear with int8 weights (a scale per input column and one per output channel)."""

    quantize = staticmethod(quantize_weight)
    product = staticmethod(int8_linear)
    weight_type = Int8Weight

    @staticmethod
    def empty_weight(out_features: int, in_features: int) -> Int8Weight:
        meta = torch.device("meta")
        return Int8Weight(
            torch.empty(out_features, in_features, dtype=torch.int8, device=meta),
            torch.empty(out_features, device=meta),
            torch.empty(in_features, device=meta),
        )


def quantize_model_int8(model: Any, device: torch.device, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the model's nn.Linear layers with Int8Linear on `device`, one at a time. Embeddings, norms and
    anything named in `skip` stay as they are."""
    return swap_linears(model, lambda linear: Int8Linear(linear, device), skip)
