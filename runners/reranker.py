"""Reranking runner: a language model judges each (query, document) pair with "yes" or "no".

The recipe of the Qwen3-Reranker model card, used by both rerank services (Qwen3-Reranker-8B, and
the plain Qwen3-4B that Z-Image-Turbo ships as its text encoder): the pair goes into a fixed chat
prompt, and the score is the probability of "yes" against "no" for the next token, i.e. the
two-way softmax of those two logits at the last position = sigmoid(yes - no).

Only two rows of the LM head matter, at one position. So the runner loads the base model alone
(no head), takes the last real token's hidden state, and dots it with the two rows: no
full-vocabulary logits are ever computed. The rows come from the checkpoint's own LM head, or,
for models that tie their word embeddings (Qwen3-4B), from the input embedding matrix.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from embed_core.config import RunnerConfig
from embed_core.errors import ModelLoadError
from embed_core.table import ServiceSpec

from .batching import CHARS_PER_TOKEN_GUESS, Batcher, plan_micro_batches, run_in_order, runner_batcher
from .loading import MAX_CHARS_PER_TOKEN, ModelFiles, prepare_model, read_json, token_limit
from .packed import packed_forward_for, pooled_final_hidden
from .pooling import LastTokenPooling
from .tokens import decode_ids, tokens_with_offsets

log = logging.getLogger(__name__)

# The Qwen3-Reranker model card's prompt, verbatim. Only the body is ever truncated.
PROMPT_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
YES, NO = "yes", "no"
LM_HEAD_WEIGHT = "lm_head.weight"  # the name of the output projection in a *ForCausalLM checkpoint


def sigmoid(logit: float) -> float:
    """1 / (1 + e^-x), without overflow for large |x|."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    grown = math.exp(logit)
    return grown / (1.0 + grown)


def prompt_body(query: str, document: str, instruction: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


@dataclass(frozen=True)
class Pair:
    """One thing to score. `instruction` is already resolved (never empty)."""

    query: str
    document: str
    instruction: str


class Reranker:
    # What a service may read while the model is unloaded (runners/idle.py): plain facts, no model or tokenizer.
    KEPT_WHEN_UNLOADED: ClassVar[frozenset[str]] = frozenset(
        {"spec", "config", "model_name", "default_instruction", "max_length"}
    )

    def __init__(self, spec: ServiceSpec, config: RunnerConfig | None = None) -> None:
        self.spec = spec
        self.config = config or RunnerConfig.from_env(spec)
        parts = prepare_model(self.config)
        files = parts.files
        self.model_name = str(files.root)
        self.device, self.dtype, self.tokenizer = parts.device, parts.dtype, parts.tokenizer
        self.default_instruction = spec.default_instruction or ""
        self.yes_id, self.no_id = (self._single_token(word) for word in (YES, NO))
        # The base transformer only: a *ForCausalLM checkpoint loads without its head (we read two of its rows below).
        self.model = parts.load_model(self.config)
        self.head_source, rows = self._yes_no_rows(files)
        self.yes_no_rows = rows.to(self.device, torch.float32)  # [2, hidden]: row 0 "yes", row 1 "no"
        log.info(
            "%s: base model loaded without its LM head (a load report listing lm_head.weight as UNEXPECTED is "
            "intended); the 'yes'/'no' rows (ids %d, %d) come from the %s",
            spec.seed_name,
            self.yes_id,
            self.no_id,
            self.head_source,
        )

        self.prefix_ids = self._encode(PROMPT_PREFIX)
        self.suffix_ids = self._encode(PROMPT_SUFFIX)
        self.max_length = token_limit(self.config.max_length, self.spec.default_max_length, self.model)
        self.body_room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_room < 1:
            raise ModelLoadError(
                f"{spec.env_prefix}_MAX_LENGTH={self.max_length} leaves no room for the query and document: the "
                f"prompt's fixed prefix and suffix alone take {len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.last_token = LastTokenPooling()
        # Qwen3 decoders run padding-free (packed sequences), as the embedding services do.
        self.packed = packed_forward_for(self.model, self.config, self.device)
        self.batcher: Batcher[Pair, float] = runner_batcher(self._score_batch, spec, self.config, cost=self._cost)

    # -- what the service asks -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.config.quantization,
            "max_length": self.max_length,
            "truncation": "pairs longer than max_length tokens lose the end of the query/document part; "
            "the prompt's fixed prefix and suffix are always kept",
            "instruction_default": self.default_instruction,
            "yes_no_rows_from": self.head_source,
            "max_items_per_request": self.config.max_items_per_request,
            "max_batch_tokens": self.config.max_batch_tokens,
            "padding_free": self.packed is not None,
            "compiled": self.packed is not None and self.packed.compiled,
        }

    def resolve_instruction(self, instruction: str | None) -> str:
        return instruction if instruction and instruction.strip() else self.default_instruction

    async def score(
        self, query: str, documents: list[str], instruction: str | None = None, raw: bool = False
    ) -> list[float]:
        """P(yes) for each document against the query, in input order; raw=True: the logit difference yes - no
        itself (TEI's raw_scores), of which P(yes) is the sigmoid. Concurrent calls share forward passes."""
        resolved = self.resolve_instruction(instruction)
        logits = await self.batcher.submit([Pair(query, document, resolved) for document in documents])
        return logits if raw else [sigmoid(logit) for logit in logits]

    async def rank(
        self,
        query: str,
        documents: list[str],
        instruction: str | None = None,
        top_k: int | None = None,
        raw: bool = False,
    ) -> list[tuple[int, float]]:
        """(original index, score), highest score first (ties keep input order), at most top_k."""
        scores = await self.score(query, documents, instruction, raw)
        order = sorted(range(len(scores)), key=lambda index: -scores[index])
        return [(index, scores[index]) for index in order[:top_k]]

    async def tokenize_texts(self, texts: list[str], add_special_tokens: bool = True) -> list[dict[str, Any]]:
        """The tokenizer's tokens of each text as it is, with character offsets (TEI's /tokenize)."""
        return await asyncio.to_thread(
            lambda: [tokens_with_offsets(self.tokenizer, text, add_special_tokens=add_special_tokens) for text in texts]
        )

    async def decode(self, lists: list[list[int]], names: list[str], skip_special_tokens: bool = True) -> list[str]:
        """The text of each list of token ids (TEI's /decode)."""
        return await asyncio.to_thread(decode_ids, self.tokenizer, lists, names, skip_special_tokens)

    # -- the model side (runs in the batcher's worker thread) ------------------------------------------

    def _score_batch(self, pairs: list[Pair]) -> list[float]:
        token_ids = self.tokenize(pairs)
        plan = plan_micro_batches(
            [len(ids) for ids in token_ids], self.config.max_batch_tokens, padded=self.packed is None
        )
        return run_in_order(plan, lambda part: self._forward([token_ids[i] for i in part]), len(pairs))

    def _cost(self, pair: Pair) -> int:
        """The queue's estimate of a pair's tokens (its characters counted, never the 10 MB body copied)."""
        characters = len(pair.query) + len(pair.document) + len(pair.instruction)
        body = min(self.body_room, characters // CHARS_PER_TOKEN_GUESS + 1)
        return len(self.prefix_ids) + body + len(self.suffix_ids)

    def tokenize(self, pairs: list[Pair]) -> list[list[int]]:
        """prefix + body + suffix; the body alone is cut (at its end) so that the whole fits max_length."""
        # Each part is cut to the characters the body's tokens can hold first (a 10 MB document would
        # otherwise be tokenized whole, holding the model's thread for seconds, only to be cut here).
        longest = self.body_room * MAX_CHARS_PER_TOKEN
        bodies = self.tokenizer(
            [prompt_body(pair.query[:longest], pair.document[:longest], pair.instruction[:longest]) for pair in pairs],
            add_special_tokens=False,
            truncation=True,
            max_length=self.body_room,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        return [self.prefix_ids + body + self.suffix_ids for body in bodies]

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> list[float]:
        # Padded on the right, then the last real token of each row: for a causal model this equals the model
        # card's left padding (no real token attends to a pad either way), with simpler position ids.
        last, positions = pooled_final_hidden(self.model, self.packed, self.last_token, batch, self.pad_id, self.device)
        last = last.float()  # [batch, hidden]
        self.batcher.forward_done("pair", len(batch), sum(len(ids) for ids in batch), positions)
        yes_no = last @ self.yes_no_rows.T  # [batch, 2]: the only two logits the score needs
        return (yes_no[:, 0] - yes_no[:, 1]).cpu().tolist()  # score() takes the sigmoid

    # -- start-up decisions ------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _single_token(self, word: str) -> int:
        ids = self._encode(word)
        if len(ids) != 1:
            raise ModelLoadError(
                f"{self.config.model_env}={self.model_name!r}: the tokenizer splits {word!r} into {len(ids)} tokens "
                f"{ids}; the reranking recipe reads the logit of {word!r} as one token, so this model cannot rerank"
            )
        return ids[0]

    def _yes_no_rows(self, files: ModelFiles) -> tuple[str, torch.Tensor]:
        """The "yes" and "no" rows of the output projection: the checkpoint's LM head, else tied input embeddings."""
        ids = [self.yes_id, self.no_id]
        rows = read_checkpoint_rows(files.model_dir, LM_HEAD_WEIGHT, ids)
        if rows is not None:
            return "lm_head", rows
        if getattr(self.model.config, "tie_word_embeddings", False):
            return "tied input embeddings", self.model.get_input_embeddings().weight[ids].detach()
        raise ModelLoadError(
            f"{self.config.model_env}={self.model_name!r}: the model has no LM head ({LM_HEAD_WEIGHT} is not in "
            f"{files.model_dir}) and does not tie its word embeddings (tie_word_embeddings is false), so the "
            "logits of 'yes' and 'no' cannot be computed. Use a causal language model such as Qwen3-Reranker-8B "
            "or Qwen3-4B."
        )

    def close(self) -> None:
        self.batcher.close()


def read_checkpoint_rows(model_dir: Path, name: str, rows: list[int]) -> torch.Tensor | None:
    """Rows of one weight straight from the checkpoint files, without loading the rest; None when absent.

    Reads safetensors lazily (one or many shards); falls back to memory-mapped PyTorch .bin files.
    """
    index = read_json(model_dir / "model.safetensors.index.json")
    if index is not None:
        shard = index.get("weight_map", {}).get(name)
        return _safetensors_rows(model_dir / shard, name, rows) if shard else None
    if (model_dir / "model.safetensors").is_file():
        return _safetensors_rows(model_dir / "model.safetensors", name, rows)
    bin_index = read_json(model_dir / "pytorch_model.bin.index.json")
    if bin_index is not None:
        shard = bin_index.get("weight_map", {}).get(name)
        return _bin_rows(model_dir / shard, name, rows) if shard else None
    if (model_dir / "pytorch_model.bin").is_file():
        return _bin_rows(model_dir / "pytorch_model.bin", name, rows)
    return None


def _safetensors_rows(path: Path, name: str, rows: list[int]) -> torch.Tensor | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as checkpoint:
        if name not in set(checkpoint.keys()):  # the file handle has no `in`
            return None
        weight = checkpoint.get_slice(name)
        return torch.cat([weight[row : row + 1] for row in rows])


def _bin_rows(path: Path, name: str, rows: list[int]) -> torch.Tensor | None:
    state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    return state[name][rows].clone() if name in state else None
