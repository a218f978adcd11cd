"""Weight-only int8 (`<NAME>_QUANTIZATION=int8`): one byte per weight, activations in the model's dtype.

Each linear layer's weight is stored as int8 with one scale per output channel (symmetric, round to
nearest, |q| <= 127); inputs, accumulation and outputs stay in the model's dtype (bf16 on GPUs, fp32
on the CPU). Two ways to run the product, chosen by device and dtype:
- `torch._weight_int8pack_mm`, one fused kernel, for bf16/fp16 on the CPU. Its fp32 CPU kernel is
  a matrix-vector loop, many times slower than fp32's own matmul on batches, so fp32 takes the other;
- `x @ int8.to(dtype).T * scale` elsewhere: one layer's weight converted at a time (never a
  dequantized copy of the model); on GPUs the compiled packed forward lets Inductor fuse it.

Hand-written rather than torchao's Int8WeightOnlyConfig (0.18): that runs the second expression
everywhere, the CPU's bf16 included, and would be one more dependency for a few lines;
bench/quant_accuracy.py compares the two (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .quantized import QuantizedLinear, swap_linears

INT8_MAX = 127  # symmetric: -128 is never used, so that -w quantizes to -q


class Int8Weight(NamedTuple):
    data: torch.Tensor  # [out, in], int8
    scale: torch.Tensor  # [out], float32: weight ~= data * scale[:, None]


def quantize_weight(weight: torch.Tensor) -> Int8Weight:
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    data = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Weight(data, scale)


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x @ dequantized(weight).T, the result in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    fused = rows.device.type == "cpu" and rows.dtype in (torch.bfloat16, torch.float16)
    out = (fused_cpu_product if fused else dequantizing_product)(rows, weight)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fused_cpu_product(rows: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    return torch._weight_int8pack_mm(rows.contiguous(), weight.data, weight.scale.to(rows.dtype))


def dequantizing_product(rows: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    return F.linear(rows, weight.data.to(rows.dtype)) * weight.scale.to(rows.dtype)


class Int8Linear(QuantizedLinear):
    """A drop-in nn.Linear with int8 weights (one scale per output channel)."""

    quantize = staticmethod(quantize_weight)
    product = staticmethod(int8_linear)
    weight_type = Int8Weight


def quantize_model_int8(model: Any, device: torch.device, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the model's nn.Linear layers with Int8Linear on `device`, one at a time. Embeddings, norms and
    anything named in `skip` stay as they are."""
    return swap_linears(model, lambda linear: Int8Linear(linear, device), skip)
