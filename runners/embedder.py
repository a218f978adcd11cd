"""Text embedding runner: tokenize, batch, run the encoder, pool, normalize.

Serves BGE (CLS), Qwen3-Embedding (last token) and a Qwen3 language model used as an encoder
(mean); which recipe applies is read from the model's own config and the service table.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .batching import Batcher, plan_least_padding, plan_micro_batches, run_splitting_on_oom
from .config import RunnerConfig
from .errors import InputError, ModelLoadError
from .loading import check_model_files, load_pretrained, load_tokenizer, pick_device, pick_dtype
from .pooling import make_pooling, read_sentence_transformers_config
from .prompts import make_prompt
from .table import ServiceSpec

log = logging.getLogger(__name__)

# Qwen3-Embedding pools the hidden state of this token, which must end every sequence exactly once.
END_OF_TEXT = "<|endoftext|>"

# A text is cut to max_length x this many characters before it is tokenized: a 10 MB text would
# otherwise hold the model's thread for seconds only to be truncated to max_length tokens. Real
# tokens average 1-6 characters, so the cut never reaches the tokens that are kept, unless the
# text's first max_length tokens average more than this (runs of thousands of spaces).
MAX_CHARS_PER_TOKEN = 32

# On the CPU padding costs as much as real tokens, and a forward pass costs about this many tokens more
# than its tokens (MiniLM-L6 on 2 EPYC cores: ~3 ms per pass, ~0.12 ms per token), so batches are cut
# by length (plan_least_padding), in passes of at most CPU_PASS_ITEMS texts. Elsewhere the fixed cost
# of a pass is large and a batch is filled up to the token budget (plan_micro_batches).
CPU_PASS_COST_TOKENS = 32
CPU_PASS_ITEMS = 64


class TextEmbedder:
    def __init__(self, spec: ServiceSpec, config: RunnerConfig | None = None) -> None:
        from transformers import AutoModel

        self.spec = spec
        self.config = config or RunnerConfig.from_env(spec)
        files = check_model_files(self.config)
        self.model_name = str(files.root)
        self.device = pick_device(self.config)
        self.dtype = pick_dtype(self.config, self.device)
        own = read_sentence_transformers_config(files.model_dir)
        self.tokenizer = load_tokenizer(files, self.config)
        self.model = load_pretrained(AutoModel, files, self.config, self.device, self.dtype)

        self.pooling = make_pooling(self.config.pooling or own.pooling or spec.default_pooling or "cls")
        self.prompt = make_prompt(spec.prompt)
        self.dimension = int(self.model.config.hidden_size)
        self.max_length = self._max_length(own.max_seq_length)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.end_id, self.tokenizer_appends_end = self._end_token()
        self.batcher: Batcher[str, torch.Tensor] = Batcher(
            self._embed_batch, max_batch_items=self.config.max_batch_items, name=spec.seed_name
        )
        if spec.dimension is not None and spec.dimension != self.dimension:
            log.warning(
                "%s: model has dimension %d, the table expects %d", spec.seed_name, self.dimension, spec.dimension
            )

    # -- what the service asks -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "dimension": self.dimension,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.config.quantization,
            "pooling": self.pooling.name,
            "max_length": self.max_length,
            "truncation": "texts longer than max_length tokens are cut at the end",
            "max_items_per_request": self.config.max_items_per_request,
            "dimensions_supported": self.dimensions_range(),
        }

    def dimensions_range(self) -> list[int]:
        low = self.spec.matryoshka_min_dim
        return [low if low is not None else self.dimension, self.dimension]

    def check_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.dimension
        low, high = self.dimensions_range()
        if not low <= dimensions <= high:
            if low == high:
                raise InputError(
                    f"this model returns {high} dimensions only; `dimensions` must be {high} or absent",
                    param="dimensions",
                )
            raise InputError(f"`dimensions` must be between {low} and {high}, got {dimensions}", param="dimensions")
        return dimensions

    async def embed(
        self, texts: list[str], instruction: str | None = None, dimensions: int | None = None
    ) -> list[list[float]]:
        """L2-normalized embeddings, in input order. Concurrent calls share forward passes."""
        size = self.check_dimensions(dimensions)
        vectors = await self.batcher.submit([self.prompt(text, instruction) for text in texts])
        stacked = torch.stack(vectors)
        if size != self.dimension:  # Matryoshka: keep the leading dimensions, then normalize again
            stacked = torch.nn.functional.normalize(stacked[:, :size], dim=-1)
        return stacked.tolist()

    # -- the model side (runs in the batcher's worker thread) ------------------------------------------

    def _embed_batch(self, texts: list[str]) -> list[torch.Tensor]:
        token_ids = self._tokenize(texts)
        results: list[torch.Tensor | None] = [None] * len(texts)
        lengths = [len(ids) for ids in token_ids]
        if self.device.type == "cpu":
            plan = plan_least_padding(lengths, self.config.max_batch_tokens, CPU_PASS_COST_TOKENS, CPU_PASS_ITEMS)
        else:
            plan = plan_micro_batches(lengths, self.config.max_batch_tokens)
        for micro_batch in plan:
            vectors = run_splitting_on_oom(lambda part: list(self._forward([token_ids[i] for i in part])), micro_batch)
            for index, vector in zip(micro_batch, vectors, strict=True):
                results[index] = vector
        return results  # type: ignore[return-value]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        room = self.max_length - (0 if self.end_id is None or self.tokenizer_appends_end else 1)
        longest = self.max_length * MAX_CHARS_PER_TOKEN
        encoded = self.tokenizer(
            [text[:longest] for text in texts],
            add_special_tokens=True,
            truncation=True,
            max_length=room,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        if self.end_id is not None and not self.tokenizer_appends_end:
            encoded = [ids + [self.end_id] for ids in encoded]
        return encoded

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):  # right padding: real tokens keep positions 0..n-1
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = self.pooling(hidden, mask).float()
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    # -- start-up decisions ------------------------------------------------------------------------

    def _max_length(self, own_limit: int | None) -> int:
        if self.config.max_length is not None:
            return self.config.max_length
        limits = [own_limit or self.spec.default_max_length]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        return min(limits)

    def _end_token(self) -> tuple[int | None, bool]:
        """For last-token pooling: the id of <|endoftext|>, and whether the tokenizer already appends it."""
        if self.pooling.name != "last":
            return None, False
        end_id = self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        if end_id is None or end_id == self.tokenizer.unk_token_id:
            raise ModelLoadError(
                f"{self.config.model_env}: last-token pooling needs the token {END_OF_TEXT} in the tokenizer"
            )
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return end_id, bool(probe) and probe[-1] == end_id

    def close(self) -> None:
        self.batcher.close()
