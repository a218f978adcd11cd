"""FP8 weights (`<NAME>_QUANTIZATION=fp8`): the arithmetic, checked on the CPU's dequantized path.

The speed of the GPU path (torch._scaled_mm) is measured in bench/, never here.
"""

from __future__ import annotations

import asyncio

import torch
import torch.nn.functional as F

from embed_core.config import RunnerConfig
from embed_core.table import SERVICES
from runners.embedder import TextEmbedder
from runners.fp8 import FP8, Fp8Linear, fp8_linear, quantize_weight


def test_weights_are_fp8_with_one_scale_per_output_channel():
    torch.manual_seed(0)
    weight = torch.randn(48, 32) * torch.linspace(0.01, 10, 48).unsqueeze(1)  # rows of very different size
    quantized = quantize_weight(weight)
    assert quantized.data.dtype == FP8 and quantized.scale.shape == (1, 48)
    restored = quantized.data.float() * quantized.scale.t()
    assert ((restored - weight).norm(dim=1) / weight.norm(dim=1)).max() < 0.05  # every row, small or large


def test_fp8_linear_is_close_to_the_full_precision_product():
    torch.manual_seed(1)
    x, weight = torch.randn(7, 64), torch.randn(32, 64)
    exact = F.linear(x, weight)
    approximate = fp8_linear(x, quantize_weight(weight))
    assert approximate.shape == exact.shape
    assert (approximate - exact).norm() / exact.norm() < 0.05
    layer = Fp8Linear(torch.nn.Linear(64, 32, bias=True), torch.device("cpu"))
    assert layer(x).shape == (7, 32)


def test_fp8_embedding_service_stays_close_to_full_precision(monkeypatch, qwen3_embedding_dir):
    spec = SERVICES["qwen3_8b_embed"]
    monkeypatch.setenv(spec.model_env, str(qwen3_embedding_dir))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    monkeypatch.setenv(spec.quantization_env, "fp8")
    fp8 = TextEmbedder(spec, RunnerConfig.from_env(spec))
    assert isinstance(fp8.model.layers[0].mlp.up_proj, Fp8Linear)
    assert fp8.packed is not None and fp8.packed.functional  # FP8 runs through the fusable weight functions
    monkeypatch.setenv(spec.quantization_env, "none")
    full = TextEmbedder(spec, RunnerConfig.from_env(spec))
    texts = ["an orange cat sleeps in the sun", "a black dog runs on the grass", "yes"]
    a = torch.tensor(asyncio.run(fp8.embed(texts)))
    b = torch.tensor(asyncio.run(full.embed(texts)))
    assert (F.cosine_similarity(a, b) > 0.99).all()
    assert fp8.describe()["quantization"] == "fp8"
    fp8.close()
    full.close()
