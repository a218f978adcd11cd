"""The forward pass as a part that a runner holds: the model in this process, or another service's copy of the
same checkpoint, so that two services of one checkpoint (Qwen3-4B's embeddings and its reranker) hold one copy
of its weights.

A pass takes token ids and a pooling rule (runners/pooling.py, by name) and gives each sequence's pooled final
hidden state, or, when vocabulary rows are named, the logits of those rows (the output projection applied to
the pooled state). A reranker names two rows ("yes" and "no") and reads two numbers per pair, so that sharing a
model never ships a whole hidden state between processes.

`LocalForward` runs the model here. The other side of a shared model is an HTTP client (embed_http/shared_model.py);
this module only states what both do (`ModelForward`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from embed_core.errors import InputError, ModelLoadError
from embed_core.table import POOLING_NAMES

from .packed import packed_forward_for, pooled_final_hidden
from .pooling import make_pooling

LM_HEAD_WEIGHT = "lm_head.weight"  # the name of the output projection in a *ForCausalLM checkpoint
MAX_VOCABULARY_ROWS = 16  # a pass reads a few rows (a reranker: two); a whole vocabulary is not what this is for


class ModelForward(Protocol):
    """One forward pass over tokenized sequences, pooled; see the module's docstring."""

    def run(
        self, batch: Sequence[Sequence[int]], pooling: str, vocabulary_rows: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, int]:
        """[sequences, hidden] pooled states, or [sequences, rows] logits (float32, on the device the model runs on:
        the caller moves them); and the positions computed (for the padding metric)."""
        ...

    def describe(self) -> dict[str, Any]: ...


class LocalForward:
    """The model in this process. Passes run one at a time (a lock), whoever asks: the runner's own queue, or a
    service that shares this model."""

    def __init__(self, model: Any, config: Any, device: torch.device, pad_id: int, model_dir: Path | None) -> None:
        self.model, self.device, self.pad_id, self.model_dir = model, device, pad_id, model_dir
        self.vocab_size = int(model.config.vocab_size)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        # Architectures with a padding-free forward (packed sequences) run it; others run padded.
        self.packed = packed_forward_for(model, config, device)
        self._rows: dict[tuple[int, ...], tuple[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"weights": "in this process"}

    @torch.inference_mode()
    def run(
        self, batch: Sequence[Sequence[int]], pooling: str, vocabulary_rows: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, int]:
        rule = make_pooling(pooling)
        with self._lock:
            pooled, positions = pooled_final_hidden(self.model, self.packed, rule, batch, self.pad_id, self.device)
            pooled = pooled.float()
            if vocabulary_rows is not None:
                pooled = pooled @ self.output_rows(vocabulary_rows)[1].T
        return pooled, positions

    def output_rows(self, ids: Sequence[int]) -> tuple[str, torch.Tensor]:
        """Where the rows of the output projection come from ("lm_head", or the tied input embeddings), and the
        rows [len(ids), hidden] in float32 on the model's device. Read once per set of ids."""
        key = tuple(ids)
        if key not in self._rows:
            self._rows[key] = self._read_output_rows(list(key))
        return self._rows[key]

    def _read_output_rows(self, ids: list[int]) -> tuple[str, torch.Tensor]:
        rows = read_checkpoint_rows(self.model_dir, LM_HEAD_WEIGHT, ids) if self.model_dir is not None else None
        if rows is not None:
            return "lm_head", rows.to(self.device, torch.float32)
        if getattr(self.model.config, "tie_word_embeddings", False):
            return "tied input embeddings", self.model.get_input_embeddings().weight[ids].detach().float()
        raise ModelLoadError(
            f"the model has no LM head ({LM_HEAD_WEIGHT} is not in {self.model_dir}) and does not tie its word "
            "embeddings (tie_word_embeddings is false), so the logits of vocabulary rows cannot be computed"
        )

    def check_request(
        self, batch: Sequence[Sequence[int]], pooling: str, vocabulary_rows: Sequence[int] | None
    ) -> None:
        """What a service sharing this model may ask: known pooling, token ids of this vocabulary, sequences the
        model can read. (The sharing service tokenized with the same tokenizer; this catches anything else.)"""
        if pooling not in POOLING_NAMES:
            raise InputError(f"`pooling` must be one of {', '.join(POOLING_NAMES)}, got {pooling!r}", param="pooling")
        if not batch:
            raise InputError("`token_ids` is empty", kind="empty", param="token_ids")
        for index, ids in enumerate(batch):
            if not ids:
                raise InputError(f"`token_ids[{index}]` is empty", kind="empty", param=f"token_ids[{index}]")
            if self.max_positions and len(ids) > self.max_positions:
                message = f"`token_ids[{index}]` has {len(ids)} tokens; this model reads at most {self.max_positions}"
                raise InputError(message, kind="too_long", param=f"token_ids[{index}]")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                message = f"`token_ids[{index}]` holds an id outside this model's vocabulary (0..{self.vocab_size - 1})"
                raise InputError(message, kind="bad_token", param=f"token_ids[{index}]")
        if vocabulary_rows is not None:
            if not 0 < len(vocabulary_rows) <= MAX_VOCABULARY_ROWS:
                message = f"`vocabulary_rows` must name 1 to {MAX_VOCABULARY_ROWS} rows, got {len(vocabulary_rows)}"
                raise InputError(message, param="vocabulary_rows")
            if min(vocabulary_rows) < 0 or max(vocabulary_rows) >= self.vocab_size:
                message = f"`vocabulary_rows` holds an id outside this model's vocabulary (0..{self.vocab_size - 1})"
                raise InputError(message, kind="bad_token", param="vocabulary_rows")


def read_checkpoint_rows(model_dir: Path, name: str, rows: list[int]) -> torch.Tensor | None:
    """Rows of one weight straight from the checkpoint files, without loading the rest; None when absent.

    Reads safetensors lazily (one or many shards); falls back to memory-mapped PyTorch .bin files.
    """
    from .loading import read_json

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
