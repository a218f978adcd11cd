"""Pooling rules: how a sequence of hidden states becomes one vector.

Each rule is a small named piece, as in sentence-transformers' Pooling module. Which one a model
uses is read from its own sentence-transformers config (modules.json + the Pooling module's
config.json); the service table gives the default for models that ship none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import InputError, ModelLoadError
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

# sentence-transformers' Pooling config keys, in the order it would honour them.
_ST_MODES = (
    ("pooling_mode_lasttoken", "last"),
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_mean_tokens", "mean"),
)


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """What a model directory's own sentence-transformers files say, if it has them."""

    pooling: str | None = None
    max_seq_length: int | None = None


def read_sentence_transformers_config(model_root: Path) -> SentenceTransformersConfig:
    modules = read_json(model_root / "modules.json")
    if not modules:
        return SentenceTransformersConfig()
    pooling = None
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            cfg = read_json(model_root / module.get("path", "") / "config.json") or {}
            pooling = next((name for key, name in _ST_MODES if cfg.get(key)), None)
            if pooling is None and any(v is True for k, v in cfg.items() if k.startswith("pooling_mode")):
                raise ModelLoadError(
                    f"{model_root}: unsupported pooling mode in {module.get('path')}/config.json: {cfg}"
                )
    bert_cfg = read_json(model_root / "sentence_bert_config.json") or {}
    return SentenceTransformersConfig(pooling=pooling, max_seq_length=bert_cfg.get("max_seq_length"))


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
