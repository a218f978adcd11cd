"""Pooling rules: how a sequence of hidden states becomes one vector.

Each rule is a small named piece, as in sentence-transformers' Pooling module. Which one a model
uses is read from its own sentence-transformers config (modules.json + the Pooling module's
config.json); the service table gives the default for models that ship none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from embed_core.errors import InputError, ModelLoadError

from .loading import read_json


class Pooling(Protocol):
    name: str
    reads: str  # the positions it reads: "all", or one per text ("first", "last"); packed forwards skip the rest

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden: [batch, seq, dim]; mask: [batch, seq] of 0/1, right-padded. Returns [batch, dim]."""
        ...

    def packed(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden: [tokens, dim] of texts packed back to back, text i at cu_seqlens[i]:cu_seqlens[i+1]."""
        ...


class ClsPooling:
    name = "cls"
    reads = "first"

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0]

    def packed(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return hidden[cu_seqlens[:-1].long()]


class MeanPooling:
    name = "mean"
    reads = "all"

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1, dtype=torch.float32)
        return summed / weights.sum(dim=1, dtype=torch.float32).clamp(min=1.0)

    def packed(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        lengths = cu_seqlens.diff().long()
        text_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        sums = torch.zeros((len(lengths), hidden.shape[-1]), dtype=torch.float32, device=hidden.device)
        return sums.index_add_(0, text_of_token, hidden.float()) / lengths.unsqueeze(1)


class LastTokenPooling:
    """The hidden state of the last real token (right padding: position length - 1)."""

    name = "last"
    reads = "last"

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def packed(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return hidden[cu_seqlens[1:].long() - 1]


POOLINGS: dict[str, type[Pooling]] = {cls.name: cls for cls in (ClsPooling, MeanPooling, LastTokenPooling)}

# sentence-transformers' pooling modes for the rules above. Its Pooling config names them in `pooling_mode`
# (a name or a list, sentence-transformers 6) or as `pooling_mode_<name>: true` keys (earlier versions).
_ST_MODES = {"lasttoken": "last", "cls": "cls", "mean": "mean"}
_ST_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
}
# The sentence-transformers modules whose effect the runner reproduces: the transformer, one pooling rule, and
# L2 normalization (which every vector gets). Any other (Dense, LayerNorm, ...) would change the vectors.
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """What a model directory's own sentence-transformers files say, if it has them."""

    pooling: str | None = None
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)  # config_sentence_transformers.json's named prompts
    default_prompt_name: str | None = None  # the prompt sentence-transformers puts before every text by default

    @property
    def default_prompt(self) -> str | None:
        return self.prompts[self.default_prompt_name] if self.default_prompt_name else None


def read_sentence_transformers_config(model_root: Path) -> SentenceTransformersConfig:
    """The model's own recipe, or a ModelLoadError for what the runner cannot reproduce (serving other
    vectors than the model's would be silent)."""
    modules = read_json(model_root / "modules.json")
    if not modules:
        return SentenceTransformersConfig()
    pooling = None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        where = (
            f"{model_root / 'modules.json'}: module {module.get('name', module.get('idx'))!r} ({module.get('type')})"
        )
        if kind not in _ST_MODULES:
            raise ModelLoadError(
                f"{where} is not served: only {', '.join(_ST_MODULES)} are, and its vectors would not be the model's"
            )
        if kind == "Pooling":
            pooling = _pooling_mode(read_json(model_root / module.get("path", "") / "config.json") or {}, where)
    bert_cfg = read_json(model_root / "sentence_bert_config.json") or {}
    own = read_json(model_root / "config_sentence_transformers.json") or {}
    prompts = own.get("prompts") or {}
    default_prompt_name = own.get("default_prompt_name") or None
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ModelLoadError(
            f"{model_root / 'config_sentence_transformers.json'}: default_prompt_name {default_prompt_name!r} "
            f"is not one of its prompts ({', '.join(prompts) or 'none'})"
        )
    return SentenceTransformersConfig(
        pooling=pooling,
        max_seq_length=bert_cfg.get("max_seq_length"),
        prompts=dict(prompts),
        default_prompt_name=default_prompt_name,
    )


def _pooling_mode(config: dict, where: str) -> str | None:
    """The one pooling rule a Pooling module's config sets (sentence-transformers concatenates several)."""
    named = config.get("pooling_mode")
    modes = [named] if isinstance(named, str) else list(named or [])
    for key, value in config.items():
        if key.startswith("pooling_mode_") and value is True:
            modes.append(_ST_LEGACY_MODES.get(key, key.removeprefix("pooling_mode_")))
    modes = list(dict.fromkeys(modes))
    if len(modes) > 1:
        raise ModelLoadError(f"{where} sets several pooling modes at once ({', '.join(modes)}); one is served")
    if modes and modes[0] not in _ST_MODES:
        raise ModelLoadError(f"{where}: unsupported pooling mode {modes[0]!r}; served are {', '.join(_ST_MODES)}")
    if config.get("include_prompt") is False:
        raise ModelLoadError(f"{where} pools without the prompt's tokens (include_prompt: false), which is not served")
    return _ST_MODES[modes[0]] if modes else None


def make_pooling(name: str) -> Pooling:
    return POOLINGS[name]()


def check_dimensions(requested: int | None, low: int, high: int) -> int:
    """The output size a request asks for (Matryoshka: the leading `requested` dimensions), checked against
    what the model was trained for; `high` when the request does not say."""
    if requested is None:
        return high
    if not low <= requested <= high:
        if low == high:
            raise InputError(
                f"this model returns {high} dimensions only; `dimensions` must be {high} or absent", param="dimensions"
            )
        raise InputError(f"`dimensions` must be between {low} and {high}, got {requested}", param="dimensions")
    return requested
