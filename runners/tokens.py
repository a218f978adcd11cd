"""Token ids in and out, for any runner with a Hugging Face tokenizer: ids checked against the model's vocabulary,
decoded to text, and a text's tokens with their character offsets (TEI's /tokenize, /decode, and /embed with ids)."""

from __future__ import annotations

from typing import Any

from embed_core.errors import InputError


def check_token_ids(ids: list[int], vocabulary: int, name: str) -> list[int]:
    """`ids` as sent, if every one is a token of the model's tokenizer (0 to vocabulary - 1)."""
    if not ids:
        raise InputError(f"`{name}` is an empty list of token ids", kind="empty", param=name)
    wrong = next((token for token in ids if not 0 <= token < vocabulary), None)
    if wrong is not None:
        message = (
            f"`{name}` holds the token id {wrong}, which is not in this model's vocabulary (0 to {vocabulary - 1})"
        )
        raise InputError(message, kind="bad_token", param=name)
    return ids


def decode_ids(tokenizer: Any, lists: list[list[int]], names: list[str], skip_special_tokens: bool) -> list[str]:
    vocabulary = len(tokenizer)
    for ids, name in zip(lists, names, strict=True):
        check_token_ids(ids, vocabulary, name)
    return [tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in lists]


def tokens_with_offsets(tokenizer: Any, text: str, shift: int = 0, **options: Any) -> dict[str, Any]:
    """{"ids", "tokens", "special", "offsets"}: the tokenizer's encoding of `text`, offsets in characters of the text
    (plus `shift`), None for the tokens the tokenizer adds."""
    encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, **options)
    ids = list(encoded["input_ids"])
    special = [bool(flag) for flag in encoded["special_tokens_mask"]]
    offsets = [
        None if flag else (start + shift, stop + shift)
        for flag, (start, stop) in zip(special, encoded["offset_mapping"], strict=True)
    ]
    return {"ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids), "special": special, "offsets": offsets}
