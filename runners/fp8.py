"""FP8 weights: the memory-saving mode that is also fast.

Each linear layer's weight is stored as float8 e4m3 with one scale per output channel (half the
memory of bf16); each input row is scaled on the fly. On GPUs with FP8 matrix units (Ada, Hopper)
the product runs in `torch._scaled_mm`, faster than bf16; elsewhere (the CPU, in tests) the same
arithmetic runs dequantized, so results are the same up to rounding, only slower.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .quantized import QuantizedLinear, swap_linears

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


class Fp8Weight(NamedTuple):
    data: torch.Tensor  # [out, in], float8 e4m3
    scale: torch.Tensor  # [1, out], float32: weight ~= data * scale.T


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return Fp8Weight((w / scale).to(FP8), scale.t().contiguous())


def fp8_linear(x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """x @ weight.T with x quantized per row (its own scale), the result in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    x_fp8 = (rows.float() / x_scale).to(FP8)
    if rows.is_cuda:
        # Row-wise scaled products give bf16 only; other activation dtypes are converted back.
        out = torch._scaled_mm(x_fp8, weight.data.t(), scale_a=x_scale, scale_b=weight.scale, out_dtype=torch.bfloat16)
        out = out.to(x.dtype)
    else:
        out = ((x_fp8.float() * x_scale) @ (weight.data.float() * weight.scale.t()).t()).to(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Fp8Linear(QuantizedLinear):
    """A drop-in nn.Linear with FP8 weights."""

    quantize = staticmethod(quantize_weight)
    product = staticmethod(fp8_linear)
    weight_type = Fp8Weight


def quantize_model_fp8(model: Any, device: torch.device, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the model's linear layers with Fp8Linear on `device`, one at a time. Layers whose sizes the FP8
    kernels cannot take stay as they are."""
    return swap_linears(
        model,
        lambda linear: Fp8Linear(linear, device),
        skip,
        takes=lambda linear: not (linear.in_features % 16 or linear.out_features % 16),
    )


def fp8_supported(device: torch.device) -> bool:
    """FP8 matrix units: compute capability 8.9 (Ada) or newer. The CPU runs the dequantized arithmetic."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)
