"""The reranking recipe against an independent reference written here from the Qwen3-Reranker model card."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from embed_core.config import RunnerConfig
from embed_core.errors import ModelLoadError
from embed_core.table import SERVICES
from runners.forward import read_checkpoint_rows
from runners.reranker import Reranker
from tests.references import CARD_PREFIX, CARD_SUFFIX, DOCUMENTS, QUERY, card_format, card_scores


@pytest.fixture
def make_reranker(monkeypatch):
    made: list[Reranker] = []

    def make(seed_name: str, model: str | Path, **env: str) -> Reranker:
        spec = SERVICES[seed_name]
        monkeypatch.setenv(spec.model_env, str(model))
        monkeypatch.setenv("EMBED_DEVICE", "cpu")
        monkeypatch.setenv("EMBED_QUANTIZATION", "none")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        reranker = Reranker(spec, RunnerConfig.from_env(spec))
        made.append(reranker)
        return reranker

    yield make
    for reranker in made:
        reranker.close()


def scores_of(reranker: Reranker, query, documents, instruction=None) -> torch.Tensor:
    return torch.tensor(asyncio.run(reranker.score(query, list(documents), instruction)))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a, b.to(a.dtype), atol=atol, rtol=0)


@pytest.fixture
def layouts(qwen3_reranker_dir, zimage_root):
    """seed name -> (what <NAME>_MODEL points at, model dir, tokenizer dir, where the yes/no rows come from)."""
    return {
        "qwen3_8b_rerank": (qwen3_reranker_dir, qwen3_reranker_dir, qwen3_reranker_dir, "lm_head"),
        "qwen3_4b_rerank": (
            zimage_root,
            zimage_root / "text_encoder",
            zimage_root / "tokenizer",
            "tied input embeddings",
        ),
    }


SEED_NAMES = ["qwen3_8b_rerank", "qwen3_4b_rerank"]


@pytest.mark.parametrize("packed", ["1", "0"], ids=["padding-free", "padded"])
@pytest.mark.parametrize("seed_name", SEED_NAMES)
def test_scores_match_model_card(make_reranker, layouts, seed_name, packed):
    root, model_dir, tokenizer_dir, head_source = layouts[seed_name]
    reranker = make_reranker(seed_name, root, EMBED_PACKED=packed)
    assert reranker.head_source == head_source
    assert (reranker.packed is not None) == (packed == "1")
    expected = card_scores(model_dir, tokenizer_dir, QUERY, DOCUMENTS)
    ours = scores_of(reranker, QUERY, DOCUMENTS)
    assert close(ours, expected), (ours, expected)
    instruction = "Retrieve images whose caption matches the query"
    assert close(
        scores_of(reranker, QUERY, DOCUMENTS, instruction),
        card_scores(model_dir, tokenizer_dir, QUERY, DOCUMENTS, instruction),
    )
    assert ((ours > 0) & (ours < 1)).all()
    # An empty or blank instruction means the default one, as `instruction=None` does in the model card.
    assert close(scores_of(reranker, QUERY, DOCUMENTS, "  "), expected)


def test_random_weights_give_distinct_scores(make_reranker, layouts):
    """Guard for the other tests: scores spread well beyond the 1e-4 tolerance and lie far apart compared
    with float noise (~1e-6), so a wrong row, position or order cannot pass by accident."""
    for seed_name in SEED_NAMES:
        reranker = make_reranker(seed_name, layouts[seed_name][0])
        scores = scores_of(reranker, QUERY, DOCUMENTS)
        gaps = (scores[:, None] - scores[None, :]).abs() + torch.eye(len(scores))
        assert gaps.min() > 1e-4 and scores.max() - scores.min() > 5e-3, (seed_name, scores)


@pytest.mark.parametrize("seed_name", SEED_NAMES)
def test_rank_orders_by_score_with_original_index(make_reranker, layouts, seed_name):
    root, model_dir, tokenizer_dir, _ = layouts[seed_name]
    reranker = make_reranker(seed_name, root)
    expected = card_scores(model_dir, tokenizer_dir, QUERY, DOCUMENTS)
    expected_order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i].item())

    ranked = asyncio.run(reranker.rank(QUERY, DOCUMENTS))
    assert [index for index, _ in ranked] == expected_order
    for index, score in ranked:
        assert abs(score - expected[index].item()) < 1e-4
    assert [score for _, score in ranked] == sorted((score for _, score in ranked), reverse=True)

    assert asyncio.run(reranker.rank(QUERY, DOCUMENTS, top_k=2)) == ranked[:2]
    assert asyncio.run(reranker.rank(QUERY, DOCUMENTS, top_k=100)) == ranked


@pytest.mark.parametrize("seed_name", SEED_NAMES)
def test_score_does_not_depend_on_neighbours(make_reranker, layouts, seed_name):
    reranker = make_reranker(seed_name, layouts[seed_name][0], EMBED_MAX_BATCH_TOKENS="400")
    target = DOCUMENTS[0]
    alone = scores_of(reranker, QUERY, [target])[0]
    neighbours = ["short", "the cat " * 60, target, "a dog " * 15, "yes"]
    together = scores_of(reranker, QUERY, neighbours)[2]
    assert abs(alone - together) < 1e-5

    async def concurrent():
        return await asyncio.gather(*(reranker.score(QUERY, [document]) for document in neighbours * 4))

    batches_before = reranker.batcher.stats.batches
    results = asyncio.run(concurrent())
    assert abs(results[2][0] - alone) < 1e-5
    assert abs(results[7][0] - alone) < 1e-5
    assert reranker.batcher.stats.batches - batches_before < len(results)  # concurrent callers shared passes


@pytest.mark.parametrize("seed_name", SEED_NAMES)
def test_truncation_cuts_the_body_and_keeps_prefix_and_suffix(make_reranker, layouts, seed_name):
    root, model_dir, tokenizer_dir, _ = layouts[seed_name]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prefix = tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    max_length = len(prefix) + len(suffix) + 40
    env_name = f"{SERVICES[seed_name].env_prefix}_MAX_LENGTH"
    reranker = make_reranker(seed_name, root, **{env_name: str(max_length)})
    assert reranker.max_length == max_length

    long_document = "the cat sat on the mat and " * 50
    [ids] = reranker.tokenize([reranker_pair(reranker, QUERY, long_document)])
    assert len(ids) == max_length
    assert ids[: len(prefix)] == prefix and ids[-len(suffix) :] == suffix
    # The document's end is what goes; the same pair without truncation is much longer.
    untruncated = tokenizer.encode(card_format(None, QUERY, long_document), add_special_tokens=False)
    assert len(untruncated) > 40 and ids[len(prefix) : -len(suffix)] == untruncated[:40]

    documents = [long_document, "an orange cat"]
    expected = card_scores(model_dir, tokenizer_dir, QUERY, documents, max_length=max_length)
    assert close(scores_of(reranker, QUERY, documents), expected)


def reranker_pair(reranker: Reranker, query: str, document: str):
    from runners.reranker import Pair

    return Pair(query, document, reranker.resolve_instruction(None))


def test_max_length_must_leave_room_for_the_body(make_reranker, qwen3_reranker_dir):
    with pytest.raises(ModelLoadError, match="MAX_LENGTH"):
        make_reranker("qwen3_8b_rerank", qwen3_reranker_dir, QWEN3_8B_RERANK_MAX_LENGTH="20")


def test_refuses_a_model_without_head_and_without_tied_embeddings(make_reranker, tmp_path, qwen3_reranker_dir):
    from transformers import Qwen3Model

    from tests.conftest import qwen3_config

    directory = tmp_path / "headless-untied"
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_reranker_dir))
    tokenizer.save_pretrained(str(directory))
    Qwen3Model(qwen3_config(len(tokenizer), tie_word_embeddings=False)).save_pretrained(str(directory))
    with pytest.raises(ModelLoadError, match="no LM head.*does not tie its word embeddings"):
        make_reranker("qwen3_4b_rerank", directory)


def test_refuses_a_tokenizer_that_splits_yes_or_no(make_reranker, tmp_path, qwen3_reranker_dir):
    """A byte-level tokenizer with no merges at all: 'yes' is three tokens."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    from tests.conftest import QWEN_SPECIALS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(QWEN_SPECIALS), special_tokens=QWEN_SPECIALS, initial_alphabet=alphabet
    )
    tok.train_from_iterator(["yes no maybe"] * 10, trainer)
    directory = tmp_path / "split-yes"
    shutil.copytree(qwen3_reranker_dir, directory)
    for stale in directory.glob("tokenizer*"):
        stale.unlink()
    Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    ).save_pretrained(str(directory))
    assert len(AutoTokenizer.from_pretrained(str(directory)).encode("yes", add_special_tokens=False)) == 3
    with pytest.raises(ModelLoadError, match="splits 'yes' into 3 tokens"):
        make_reranker("qwen3_8b_rerank", directory)


def test_head_rows_are_read_from_sharded_checkpoints(qwen3_reranker_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_reranker_dir))
    model.save_pretrained(str(tmp_path), max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    rows = read_checkpoint_rows(tmp_path, "lm_head.weight", [7, 3])
    assert torch.equal(rows, model.lm_head.weight[[7, 3]].detach())
    assert read_checkpoint_rows(tmp_path, "no.such.weight", [0]) is None


@pytest.mark.parametrize("seed_name", SEED_NAMES)
def test_bnb_int8_loads_and_answers_on_cpu(make_reranker, layouts, seed_name):
    import bitsandbytes as bnb

    root, model_dir, tokenizer_dir, head_source = layouts[seed_name]
    reranker = make_reranker(seed_name, root, EMBED_QUANTIZATION="bnb-int8")
    assert reranker.describe()["quantization"] == "bnb-int8"
    quantized = [module for module in reranker.model.modules() if isinstance(module, bnb.nn.Linear8bitLt)]
    assert len(quantized) == 2 * 7  # every attention and MLP projection of both layers
    assert quantized[0].weight.dtype == torch.int8
    assert reranker.head_source == head_source
    ours = scores_of(reranker, QUERY, DOCUMENTS)
    # int8 weights move the scores a little (measured up to 0.02 on these tiny models), no more.
    assert close(ours, card_scores(model_dir, tokenizer_dir, QUERY, DOCUMENTS), atol=5e-2)
    assert ((ours > 0) & (ours < 1)).all()
