"""Prompt rules: how an optional instruction and a text become the string the model reads.

Small named pieces; the service table says which rule a model family uses.
"""

from __future__ import annotations

import re
from typing import Protocol


class Prompt(Protocol):
    name: str

    def __call__(self, text: str, instruction: str | None) -> str: ...

    def instruction_in(self, prompt: str) -> str | None:
        """The instruction that makes this rule put `prompt` before a text (a sentence-transformers prompt
        of the model's own config), or None when this rule cannot."""
        ...


class InstructQueryPrompt:
    """Qwen3-Embedding's model card: `Instruct: {instruction}\\nQuery:{text}` (no space after `Query:`)."""

    name = "instruct_query"

    def __call__(self, text: str, instruction: str | None) -> str:
        if not instruction or not instruction.strip():  # a blank instruction means none, as in the rerankers
            return text
        return f"Instruct: {instruction}\nQuery:{text}"

    def instruction_in(self, prompt: str) -> str | None:
        if not prompt:
            return ""
        found = re.fullmatch(r"Instruct: (.+)\nQuery:", prompt, flags=re.DOTALL)
        return found.group(1) if found else None


class PrefixPrompt:
    """BGE: the instruction is put in front of the text verbatim.

    BGE-large-zh-v1.5's query instruction is `为这个句子生成表示以用于检索相关文章：`.
    """

    name = "prefix"

    def __call__(self, text: str, instruction: str | None) -> str:
        return f"{instruction}{text}" if instruction and instruction.strip() else text

    def instruction_in(self, prompt: str) -> str | None:
        return prompt


PROMPTS: dict[str, type[Prompt]] = {cls.name: cls for cls in (InstructQueryPrompt, PrefixPrompt)}


def make_prompt(name: str | None) -> Prompt:
    return PROMPTS[name or "prefix"]()
