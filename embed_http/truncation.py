"""Truncation control and token counts on the seed-style text paths: the request fields and /tokenize/texts' answer.

By default a text over max_length tokens is cut at the end (the seed's behaviour); `truncation_direction:
"left"` keeps its end instead, and `truncate: false` refuses it (413, naming the text and its token count).
"""

from __future__ import annotations

import typing as t

from pydantic import BaseModel

TruncationDirection = t.Literal["right", "left"]  # a Literal is strict already: only these strings


class TokenizedText(BaseModel):
    ids: list[int]  # what the model reads: the prompt (instruction and text) with its special tokens
    tokens: list[str]  # the tokenizer's own token strings for those ids
    count: int


class TokenizeResponse(BaseModel):
    results: list[TokenizedText]  # in input order
