"""Reranking runner: a language model judges each (query, document) pair with "yes" or "no".

The recipe of the Qwen3-Reranker model card, used by both rerank services (Qwen3-Reranker-8B, and
the plain Qwen3-4B that Z-Image-Turbo ships as its text encoder): the pair goes into a fixed chat
prompt, and the score is the probability of "yes" against "no" for the next token, i.e. the
two-way softmax of those two logits at the last position = sigmoid(yes - no).

Only two rows of the LM head matter, at one position. So the runner loads the base model alone
(no head), takes the last real token's hidden state, and dots it with the two rows: no
full-vocabulary logits are ever computed. The rows come from the checkpoint's own LM head, or,
for models that tie their word embeddings (Qwen3-4B), from the input embedding matrix (runners/forward.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from embed_core.config import RunnerConfig
from embed_core.errors import ModelLoadError
from embed_core.table import ServiceSpec

from .batching import CHARS_PER_TOKEN_GUESS, Batcher, plan_micro_batches, run_in_order, runner_batcher
from .forward import LocalForward, ModelForward
from .loading import MAX_CHARS_PER_TOKEN, prepare_model, token_limit
from .tokens import decode_ids, tokens_with_offsets

log = logging.getLogger(__name__)

# The Qwen3-Reranker model card's prompt, verbatim. Only the body is ever truncated.
PROMPT_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
YES, NO = "yes", "no"


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

    def __init__(
        self, spec: ServiceSpec, config: RunnerConfig | None = None, shared: ModelForward | None = None
    ) -> None:
        """Load the model that `<NAME>_MODEL` names; or, given `shared` (another service's copy of the same
        checkpoint, runners/forward.py), load its tokenizer and configuration alone and run every pass there."""
        self.spec = spec
        self.config = config or RunnerConfig.from_env(spec)
        parts = prepare_model(self.config)
        files = parts.files
        self.model_name = str(files.root)
        self.device, self.dtype, self.tokenizer = parts.device, parts.dtype, parts.tokenizer
        self.default_instruction = spec.default_instruction or ""
        self.yes_id, self.no_id = (self._single_token(word) for word in (YES, NO))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if shared is None:
            # The base transformer only: a *ForCausalLM checkpoint loads without its head (two of its rows are
            # read from the checkpoint by LocalForward.output_rows).
            model = parts.load_model(self.config)
            local = LocalForward(model, self.config, self.device, self.pad_id, files.model_dir)
            self.forward: ModelForward = local
            self.model, self.packed = model, local.packed
            try:
                self.head_source, self.yes_no_rows = local.output_rows([self.yes_id, self.no_id])
            except ModelLoadError as exc:
                raise ModelLoadError(
                    f"{self.config.model_env}={self.model_name!r}: {exc}. Use a causal language model such as "
                    "Qwen3-Reranker-8B or Qwen3-4B."
                ) from None
            model_config = model.config
            log.info(
                "%s: base model loaded without its LM head (a load report listing lm_head.weight as UNEXPECTED is "
                "intended); the 'yes'/'no' rows (ids %d, %d) come from the %s",
                spec.seed_name,
                self.yes_id,
                self.no_id,
                self.head_source,
            )
        else:
            from transformers import AutoConfig

            self.forward, self.model, self.packed = shared, None, None
            self.head_source = "the shared model's output projection"
            model_config = AutoConfig.from_pretrained(str(files.model_dir))
            log.info("%s: no weights loaded here; every pass runs on %s", spec.seed_name, shared.describe()["weights"])

        self.prefix_ids = self._encode(PROMPT_PREFIX)
        self.suffix_ids = self._encode(PROMPT_SUFFIX)
        self.max_length = token_limit(self.config.max_length, self.spec.default_max_length, model_config)
        self.body_room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_room < 1:
            raise ModelLoadError(
                f"{spec.env_prefix}_MAX_LENGTH={self.max_length} leaves no room for the query and document: the "
                f"prompt's fixed prefix and suffix alone take {len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )
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
            **self.forward.describe(),
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

    def _forward(self, batch: list[list[int]]) -> list[float]:
        # The last real token of each sequence (padded on the right when padded at all: for a causal model this
        # equals the model card's left padding), projected onto the "yes" and "no" rows alone: no
        # full-vocabulary logits are ever computed.
        yes_no, positions = self.forward.run(batch, "last", [self.yes_id, self.no_id])  # [batch, 2]
        self.batcher.forward_done("pair", len(batch), sum(len(ids) for ids in batch), positions)
        return (yes_no[:, 0] - yes_no[:, 1]).tolist()  # score() takes the sigmoid

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

    def close(self) -> None:
        self.batcher.close()
