"""Text embedding runner: tokenize, batch, run the encoder, pool, normalize.

Serves BGE (CLS), Qwen3-Embedding (last token) and a Qwen3 language model used as an encoder
(mean); which recipe applies is read from the model's own config and the service table.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from pathlib import Path
from typing import Any, ClassVar

import torch

from embed_core.config import RunnerConfig
from embed_core.errors import InputError, ModelLoadError, Overloaded
from embed_core.table import ServiceSpec

from .batching import Batcher, plan_least_padding, plan_micro_batches, run_in_order, runner_batcher, text_cost
from .forward import LocalForward
from .loading import MAX_CHARS_PER_TOKEN, prepare_model, token_limit
from .pooling import SentenceTransformersConfig, check_dimensions, make_pooling, read_sentence_transformers_config
from .prompts import Prompt, make_prompt
from .tokens import check_token_ids, decode_ids, tokens_with_offsets

log = logging.getLogger(__name__)

# Qwen3-Embedding pools the hidden state of this token, which must end every sequence exactly once.
END_OF_TEXT = "<|endoftext|>"

# On the CPU padding costs as much as real tokens, and a forward pass costs about this many tokens more
# than its tokens (measured: BENCHMARKS.md), so batches are cut by length (plan_least_padding), in passes
# of at most CPU_PASS_ITEMS texts. Elsewhere the fixed cost of a pass is large and a batch is filled up to
# the token budget (plan_micro_batches).
CPU_PASS_COST_TOKENS = 32
CPU_PASS_ITEMS = 64


class TextEmbedder:
    # What a service may read while the model is unloaded (runners/idle.py): plain facts, no model or tokenizer.
    KEPT_WHEN_UNLOADED: ClassVar[frozenset[str]] = frozenset(
        {"spec", "config", "model_name", "prompt", "default_instruction", "named_prompts", "dimension", "max_length"}
    )

    def __init__(self, spec: ServiceSpec, config: RunnerConfig | None = None) -> None:
        """Load the model that `<NAME>_MODEL` names, as the environment configures it."""
        config = config or RunnerConfig.from_env(spec)
        parts = prepare_model(config)
        own = read_sentence_transformers_config(parts.files.model_dir)  # refused before the weights load
        default_instruction(spec, own, str(parts.files.root))
        model = parts.load_model(config)
        self._setup(spec, config, model, parts.tokenizer, str(parts.files.root), own, parts.files.model_dir)

    @classmethod
    def from_model(
        cls,
        spec: ServiceSpec,
        config: RunnerConfig,
        model: Any,
        tokenizer: Any,
        own: SentenceTransformersConfig | None = None,
    ) -> TextEmbedder:
        """Wrap a model already in memory (benchmarks build random-weight models of the real shapes)."""
        embedder = cls.__new__(cls)
        embedder._setup(spec, config, model, tokenizer, "in-memory", own or SentenceTransformersConfig(), None)
        return embedder

    def _setup(
        self,
        spec: ServiceSpec,
        config: RunnerConfig,
        model: Any,
        tokenizer: Any,
        model_name: str,
        own: SentenceTransformersConfig,
        model_dir: Path | None,
    ) -> None:
        self.spec, self.config, self.model, self.tokenizer, self.model_name = spec, config, model, tokenizer, model_name
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.pooling = make_pooling(config.pooling or own.pooling or spec.default_pooling or "cls")
        self.prompt = make_prompt(spec.prompt)
        # The model's own default prompt (sentence-transformers' default_prompt_name), for texts sent without one.
        self.default_instruction = default_instruction(spec, own, model_name)
        # Its named prompts too, read once: what TEI's `prompt_name` picks (embed_http/tei.py).
        self.named_prompts: dict[str, str] = {k: v for k, v in own.prompts.items() if isinstance(v, str)}
        self.dimension = int(model.config.hidden_size)
        self.max_length = token_limit(config.max_length, own.max_seq_length or spec.default_max_length, model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.end_id, self.tokenizer_appends_end = self._end_token()
        # Per-request truncation and /tokenize use a copy of the tokenizer, one call at a time: a call sets the
        # tokenizer's truncation state, which must not change under the batcher's thread.
        self._exact_tokenizer, self._exact_lock = copy.deepcopy(tokenizer), threading.Lock()
        # The forward pass (runners/forward.py), which another service of the same checkpoint may share.
        self.forward = LocalForward(model, config, self.device, self.pad_id, model_dir)
        self.packed = self.forward.packed
        self.batcher: Batcher[str | list[int], tuple[torch.Tensor, int]] = runner_batcher(
            self._embed_batch, spec, config, cost=text_cost(self.max_length)
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
            "max_batch_tokens": self.config.max_batch_tokens,
            "padding_free": self.packed is not None,
            "compiled": self.packed is not None and self.packed.compiled,
            "batches": self.batcher.stats.batches,
            "texts_embedded": self.batcher.stats.items,
            **self.forward.describe(),
        }

    def dimensions_range(self) -> list[int]:
        low = self.spec.matryoshka_min_dim
        return [low if low is not None else self.dimension, self.dimension]

    def check_dimensions(self, dimensions: int | None) -> int:
        return check_dimensions(dimensions, *self.dimensions_range())

    async def embed(
        self, texts: list[str], instruction: str | None = None, dimensions: int | None = None
    ) -> list[list[float]]:
        """L2-normalized embeddings, in input order. Concurrent calls share forward passes."""
        vectors, _ = await self.embed_counted(texts, instruction, dimensions)
        return vectors

    async def embed_counted(
        self,
        texts: list[str],
        instruction: str | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        truncation_direction: str = "right",
        names: list[str] | None = None,
    ) -> tuple[list[list[float]], int]:
        """embed(), plus the number of tokens the model read (prompt, special tokens, after truncation).

        A text over max_length tokens is cut at the end; with truncation_direction="left" its end is kept, and
        with truncate=False it is refused (kind too_long, naming it from `names`, with its token count)."""
        return await self.embed_inputs(texts, instruction, dimensions, truncate, truncation_direction, names)

    async def embed_inputs(
        self,
        inputs: list[str | list[int]],
        instruction: str | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        truncation_direction: str = "right",
        names: list[str] | None = None,
    ) -> tuple[list[list[float]], int]:
        """embed_counted() for texts and token-id lists mixed (TEI's `inputs`). Token ids are the model's own
        tokens, read as sent (special tokens included, no prompt added): ids that /tokenize gave for a text embed
        to that text's vector. Over max_length they are cut from `truncation_direction`, or refused."""
        size = self.check_dimensions(dimensions)
        names = names or [f"texts[{index}]" for index in range(len(inputs))]
        texts = [(index, text) for index, text in enumerate(inputs) if isinstance(text, str)]
        items: list[str | list[int]] = list(inputs)
        if texts:
            prompts = self.prompts([text for _, text in texts], instruction)
            if truncate and truncation_direction == "right":  # the default: the batcher's thread tokenizes
                tokenized: list[str | list[int]] = list(prompts)
            else:
                encoded = await self.tokenize(prompts, [names[i] for i, _ in texts], truncate, truncation_direction)
                tokenized = [item["ids"] for item in encoded]
            for (index, _), item in zip(texts, tokenized, strict=True):
                items[index] = item
        for index, item in enumerate(inputs):
            if isinstance(item, list):
                checked = check_token_ids(item, len(self.tokenizer), names[index])
                items[index] = self._fit(checked, names[index], truncate, truncation_direction)
        results = await self.batcher.submit(items)
        stacked = torch.stack([vector for vector, _ in results])
        if size != self.dimension:  # Matryoshka: keep the leading dimensions, then normalize again
            stacked = torch.nn.functional.normalize(stacked[:, :size], dim=-1)
        return stacked.tolist(), sum(tokens for _, tokens in results)

    def _fit(self, ids: list[int], name: str, truncate: bool, side: str) -> list[int]:
        """Token ids within max_length: cut from `side`, or refused when truncate is false."""
        if len(ids) <= self.max_length:
            return ids
        if not truncate:
            message = f"`{name}` is {len(ids)} tokens long; this model reads at most {self.max_length}"
            raise InputError(message, kind="too_long", param=name)
        return ids[-self.max_length :] if side == "left" else ids[: self.max_length]

    async def decode(self, lists: list[list[int]], names: list[str], skip_special_tokens: bool = True) -> list[str]:
        """The text of each list of token ids (TEI's /decode)."""
        return await asyncio.to_thread(self._decode, lists, names, skip_special_tokens)

    def _decode(self, lists: list[list[int]], names: list[str], skip_special_tokens: bool) -> list[str]:
        with self._exact_lock:
            return decode_ids(self._exact_tokenizer, lists, names, skip_special_tokens)

    def prompts(self, texts: list[str], instruction: str | None = None) -> list[str]:
        """What the model reads for each text: its prompt, with the model's default instruction when none is sent."""
        if not instruction or not instruction.strip():
            instruction = self.default_instruction
        return [self.prompt(text, instruction) for text in texts]

    # -- the model side (runs in the batcher's worker thread) ------------------------------------------

    async def tokenize(
        self,
        prompts: list[str],
        names: list[str] | None = None,
        truncate: bool = True,
        truncation_direction: str = "right",
    ) -> list[dict[str, Any]]:
        """What the model reads for each prompt: {"ids", "tokens", "special", "offsets" (characters of the prompt,
        None for added tokens)}, truncated as asked (truncate=False: a 413 for a prompt over max_length)."""
        names = names or [f"texts[{index}]" for index in range(len(prompts))]
        return await asyncio.to_thread(self._tokenize_exact, prompts, names, truncate, truncation_direction)

    def _tokenize_exact(self, prompts: list[str], names: list[str], truncate: bool, side: str) -> list[dict[str, Any]]:
        appends = self.end_id is not None and not self.tokenizer_appends_end
        room = self.max_length - (1 if appends else 0)
        longest = self.max_length * MAX_CHARS_PER_TOKEN
        results = []
        with self._exact_lock:
            tokenizer = self._exact_tokenizer
            tokenizer.truncation_side = side
            for prompt, name in zip(prompts, names, strict=True):
                if not truncate:
                    # Counted on at most `longest` characters, as everywhere (a 10 MB text must not hold the
                    # tokenizer for seconds): a longer prompt is over the limit whatever its exact count.
                    count = len(tokenizer(prompt[:longest], add_special_tokens=True)["input_ids"]) + int(appends)
                    if count > self.max_length or len(prompt) > longest:
                        at_least = "at least " if len(prompt) > longest else ""
                        limit = self.max_length
                        message = f"`{name}` is {at_least}{count} tokens long; this model reads at most {limit}"
                        raise InputError(message, kind="too_long", param=name)
                # As _tokenize: a text far over the limit is cut by characters first (from the side that goes).
                shift = max(0, len(prompt) - longest) if side == "left" else 0
                text = prompt[shift:] if side == "left" else prompt[:longest]
                options = {"add_special_tokens": True, "truncation": True, "max_length": room}
                item = tokens_with_offsets(tokenizer, text, shift, **options)
                if appends:
                    item["ids"].append(self.end_id)
                    item["tokens"].extend(tokenizer.convert_ids_to_tokens([self.end_id]))
                    item["special"].append(True)
                    item["offsets"].append(None)
                results.append(item)
        return results

    def _embed_batch(self, texts: list[str | list[int]]) -> list[tuple[torch.Tensor, int]]:
        """Each text's vector and its token count (counted here, from the tokenization the model reads). Items
        tokenized already (per-request truncation) are read as they are."""
        strings = [text for text in texts if isinstance(text, str)]
        fresh = iter(self._tokenize(strings) if strings else [])
        token_ids = [next(fresh) if isinstance(text, str) else text for text in texts]
        return list(zip(self.embed_token_ids(token_ids), (len(ids) for ids in token_ids), strict=True))

    def embed_token_ids(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Normalized vectors for tokenized texts, in order, run in micro-batches of similar length."""
        lengths = [len(ids) for ids in token_ids]
        budget = self.config.max_batch_tokens
        if self.packed is not None:  # padding-free: fill each pass up to the budget of real tokens
            plan = plan_micro_batches(lengths, budget, padded=False)
        elif self.device.type == "cpu":  # padding costs as much as real tokens: cut where it pays
            plan = plan_least_padding(lengths, budget, CPU_PASS_COST_TOKENS, CPU_PASS_ITEMS)
        else:
            plan = plan_micro_batches(lengths, budget)
        return run_in_order(plan, lambda part: list(self._forward([token_ids[i] for i in part])), len(token_ids))

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

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        pooled, positions = self.forward.run(batch, self.pooling.name)
        self.batcher.forward_done("text", len(batch), sum(len(ids) for ids in batch), positions)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()  # normalized where the model runs

    async def shared_forward(
        self, token_ids: list[list[int]], pooling: str, vocabulary_rows: list[int] | None = None
    ) -> tuple[list[list[float]], int]:
        """A pass for another service that shares this model (runners/forward.py), checked first: its vectors or
        vocabulary logits, and the positions computed. Runs beside this service's own queue, one pass at a time."""
        self.forward.check_request(token_ids, pooling, vocabulary_rows)
        try:
            values, positions = await asyncio.to_thread(self.forward.run, token_ids, pooling, vocabulary_rows)
        except torch.OutOfMemoryError:  # the sharing service cuts its passes to its own budget; this one did not fit
            raise Overloaded("out of device memory for this pass; send fewer or shorter sequences") from None
        return values.cpu().tolist(), positions

    # -- start-up decisions ------------------------------------------------------------------------

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


def default_instruction(spec: ServiceSpec, own: SentenceTransformersConfig, where: str) -> str | None:
    """The model's own prompts (config_sentence_transformers.json) cross-checked against the table's prompt
    rule, and the instruction its default prompt stands for: a prompt the rule cannot write stops the service,
    so that an instruction never means something else than the model's prompt."""
    rule: Prompt = make_prompt(spec.prompt)
    for name, prompt in own.prompts.items():
        if rule.instruction_in(prompt) is None:
            raise ModelLoadError(
                f"{spec.model_env}={where!r}: its sentence-transformers prompt {name!r} ({prompt!r}) is not one the "
                f"table's {rule.name!r} prompt rule writes for {spec.seed_name}; this model does not fit the service"
            )
    default = own.default_prompt
    return (rule.instruction_in(default) or None) if default is not None else None
