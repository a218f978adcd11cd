"""A 10 MB text is cut by characters before it is tokenized, in every runner and every tokenizing path: the
tokenizer never reads more than max_length x MAX_CHARS_PER_TOKEN characters of it, and the answer is the one for
the text's first max_length tokens. (Over HTTP, tests/test_robustness_http.py sends the same 10 MB texts.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from embed_core.config import RunnerConfig
from embed_core.table import SERVICES
from runners.embedder import TextEmbedder
from runners.loading import MAX_CHARS_PER_TOKEN
from runners.reranker import Reranker
from runners.siglip import ImageSettings, SiglipEmbedder

WORDS = "an orange cat "
HUGE = WORDS * (10_000_000 // len(WORDS))
LONG = WORDS * 400  # already over every tiny model's max_length in tokens


class Recording:
    """A tokenizer that records the longest text it was handed, and otherwise is the tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        for one in [text] if isinstance(text, str) else text:
            self.longest = max(self.longest, len(one))
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("tokenizer", "longest"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.tokenizer, name, value)


def runner(monkeypatch, seed_name: str, model_dir) -> Any:
    spec = SERVICES[seed_name]
    for key, value in {spec.model_env: str(model_dir), "EMBED_DEVICE": "cpu", "EMBED_COMPILE": "0",
                       spec.quantization_env: "none"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    config = RunnerConfig.from_env(spec)
    if spec.kind == "rerank":
        return Reranker(spec, config)
    if spec.kind == "image_embedding":
        return SiglipEmbedder(spec, config, ImageSettings.from_env(spec))
    return TextEmbedder(spec, config)


def record(made: Any, attribute: str) -> Recording:
    recording = Recording(getattr(made, attribute))
    setattr(made, attribute, recording)
    return recording


@pytest.mark.parametrize(
    ("seed_name", "fixture"),
    [("bge_embed", "bge_dir"), ("qwen3_8b_embed", "qwen3_embedding_dir"), ("qwen3_4b_embed", "zimage_root")],
)
@pytest.mark.parametrize("direction", ["right", "left"])
def test_text_embedders_cut_characters_first(monkeypatch, request, seed_name, fixture, direction):
    made = runner(monkeypatch, seed_name, request.getfixturevalue(fixture))
    # The default (right) is tokenized in the batcher's thread; the other direction up front, exactly.
    recording = record(made, "tokenizer" if direction == "right" else "_exact_tokenizer")

    def embed(text: str) -> torch.Tensor:
        vectors, _ = asyncio.run(made.embed_counted([text], truncation_direction=direction))
        return torch.tensor(vectors[0])

    huge, long = embed(HUGE), embed(LONG)
    made.close()
    assert 0 < recording.longest <= made.max_length * MAX_CHARS_PER_TOKEN + 200  # + the prompt around the text
    assert torch.allclose(huge, long, atol=1e-5)  # the same first (or last) max_length tokens


@pytest.mark.parametrize(
    ("seed_name", "fixture"), [("qwen3_8b_rerank", "qwen3_reranker_dir"), ("qwen3_4b_rerank", "zimage_root")]
)
def test_rerankers_cut_characters_first(monkeypatch, request, seed_name, fixture):
    made = runner(monkeypatch, seed_name, request.getfixturevalue(fixture))
    recording = record(made, "tokenizer")
    huge = asyncio.run(made.score("a cat", [HUGE]))
    long = asyncio.run(made.score("a cat", [LONG]))
    made.close()
    assert 0 < recording.longest <= 3 * made.body_room * MAX_CHARS_PER_TOKEN + 500  # query, document, instruction
    assert huge == pytest.approx(long, abs=1e-5)


def test_siglip_text_tower_cuts_characters_first(monkeypatch, siglip_dir):
    made = runner(monkeypatch, "siglip2_embed", siglip_dir)
    recording = record(made, "tokenizer")
    huge, long = (torch.tensor(asyncio.run(made.embed_texts([text]))[0]) for text in (HUGE, LONG))
    made.close()
    assert 0 < recording.longest <= made.max_length * MAX_CHARS_PER_TOKEN
    assert torch.allclose(huge, long, atol=1e-5)
