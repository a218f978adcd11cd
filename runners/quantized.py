"""What the swapped quantization modes share (runners/int8.py, runners/fp8.py): a drop-in nn.Linear whose
weight is stored quantized, and the swap of a model's nn.Linear layers for it, applied at load time so that
the forwards need no change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch


class QuantizedLinear(torch.nn.Module):
    """nn.Linear with a quantized weight: a subclass names how to quantize a weight and how to multiply by it."""

    quantize: ClassVar[Callable[[torch.Tensor], Any]]
    product: ClassVar[Callable[[torch.Tensor, Any], torch.Tensor]]
    weight_type: ClassVar[type]  # a NamedTuple of tensors; each field is kept as the buffer weight_<field>

    def __init__(self, linear: torch.nn.Linear, device: torch.device) -> None:
        super().__init__()
        if device.type == "meta":  # a shell for cached weights (runners/weight_cache.py): shapes only, no arithmetic
            weight = type(self).empty_weight(linear.out_features, linear.in_features)
        else:
            weight = type(self).quantize(linear.weight.data.to(device))
        for field, tensor in zip(self.weight_type._fields, weight, strict=True):  # weight_data, weight_scale, ...
            self.register_buffer(f"weight_{field}", tensor)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data.to(device))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def empty_weight(out_features: int, in_features: int) -> Any:
        """The weight_type of a [out, in] weight on the meta device (a mode that is cached names it)."""
        raise NotImplementedError

    @property
    def quantized(self) -> Any:
        return self.weight_type(*(getattr(self, f"weight_{field}") for field in self.weight_type._fields))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = type(self).product(x, self.quantized)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(
    model: Any,
    make: Callable[[torch.nn.Linear], torch.nn.Module],
    skip: tuple[str, ...] = ("lm_head",),
    takes: Callable[[torch.nn.Linear], bool] = lambda linear: True,
) -> int:
    """Replace each plain nn.Linear (not named in `skip`, and one `takes` accepts) by `make(linear)`, one at a
    time (so the full-precision model never has to fit on the GPU). Returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or any(part in full_name for part in skip) or not takes(child):
                continue
            setattr(module, child_name, make(child))
            replaced += 1
    return replaced
