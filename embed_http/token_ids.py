"""OpenAI's token-id input on /v1/embeddings: `input` as a list of ids or a list of lists of ids.

In OpenAI's API those are ids of OpenAI's own tokenizer (tiktoken's cl100k_base for the embedding models),
and LangChain's OpenAIEmbeddings sends them at its defaults (it tokenizes with tiktoken to chunk long
texts). Each list is decoded back to its text with the encoding for the request's `model` (cl100k_base for
a name tiktoken does not know) and then embedded exactly as that text would be.

tiktoken downloads an encoding's file on first use and keeps it in its cache (TIKTOKEN_CACHE_DIR). Where
there is no network, `<NAME>_TIKTOKEN_DIR` / `EMBED_TIKTOKEN_DIR` can name a folder holding the files
themselves (`cl100k_base.tiktoken`, as OpenAI publishes it).
"""

from __future__ import annotations

import asyncio
import os
import threading
import typing as t

from embed_core.config import setting
from embed_core.errors import InputError
from embed_core.table import ServiceSpec

DEFAULT_ENCODING = "cl100k_base"  # OpenAI's embedding models', and LangChain's for any other model name
_lock = threading.Lock()
_encodings: dict[tuple[str | None, str], t.Any] = {}


def is_token_input(value: t.Any) -> bool:
    """A list of ints, or a list whose items are lists: OpenAI's two token-id forms (checked in detail later)."""
    return isinstance(value, list) and bool(value) and all(isinstance(item, (int, list)) for item in value)


def encoding_name(model: str | None) -> str:
    import tiktoken

    try:
        return tiktoken.encoding_name_for_model(model or "")
    except KeyError:
        return DEFAULT_ENCODING


def load_encoding(name: str, directory: str | None) -> t.Any:
    """tiktoken's encoding `name`: from `directory/<name>.tiktoken` when that file exists (the encoding's own
    pattern and special tokens, the ranks from the file), else through tiktoken (its cache, or a download)."""
    import tiktoken

    key = (directory, name)
    with _lock:
        if key not in _encodings:
            path = os.path.join(directory, f"{name}.tiktoken") if directory else None
            if path and os.path.isfile(path):
                from unittest import mock

                import tiktoken_ext.openai_public as public
                from tiktoken.load import load_tiktoken_bpe

                ranks = load_tiktoken_bpe(path)
                # The constructor holds the pattern and special tokens; it would fetch the ranks from OpenAI.
                with mock.patch.object(public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks):
                    _encodings[key] = tiktoken.Encoding(**public.ENCODING_CONSTRUCTORS[name]())
            else:
                _encodings[key] = tiktoken.get_encoding(name)
        return _encodings[key]


def token_lists(value: list[t.Any]) -> dict[str, list[int]]:
    """The request's token-id lists by the name of their input, or a 400 naming the input that is not one."""
    single = all(isinstance(item, int) for item in value)
    lists = {"input": value} if single else {f"input[{index}]": ids for index, ids in enumerate(value)}
    for name, ids in lists.items():
        if not isinstance(ids, list) or not ids:
            raise InputError(f"`{name}` must be a non-empty list of token ids (integers)", param=name)
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in ids):
            raise InputError(f"`{name}` must hold token ids (integers) only", param=name)
    return lists


def decode_all(lists: dict[str, list[int]], model: str | None, directory: str | None) -> list[str]:
    name = encoding_name(model)
    try:
        encoding = load_encoding(name, directory)
    except Exception as exc:  # no network and no cached file, a file that fails tiktoken's hash check, ...
        raise InputError(
            f"`input` holds token ids, which are decoded with tiktoken's {name} encoding, and it is not available "
            f"here ({type(exc).__name__}: {exc}). Put {name}.tiktoken in the folder EMBED_TIKTOKEN_DIR names, or "
            f"in tiktoken's cache (TIKTOKEN_CACHE_DIR), or send the text itself (LangChain: "
            f"OpenAIEmbeddings(..., check_embedding_ctx_length=False))",
            param="input",
        ) from None
    texts = []
    for name_of, ids in lists.items():
        top = encoding.max_token_value
        wrong = next((token for token in ids if not 0 <= token <= top), None)
        try:
            if wrong is not None:
                raise KeyError(wrong)
            texts.append(encoding.decode(ids))
        except KeyError:
            bad = wrong if wrong is not None else next(tok for tok in ids if not _decodes(encoding, tok))
            raise InputError(
                f"`{name_of}` holds the token id {bad}, which is not in the {encoding.name} encoding (0 to {top})",
                param=name_of,
            ) from None
    return texts


def _decodes(encoding: t.Any, token: int) -> bool:
    try:
        encoding.decode_single_token_bytes(token)
        return True
    except KeyError:
        return False


async def decode_token_input(value: list[t.Any], model: str | None, spec: ServiceSpec, limit: int) -> list[str]:
    """The texts that the token-id lists in `input` stand for, in order (decoded off the event loop: loading an
    encoding may read or download a file)."""
    lists = token_lists(value)
    if len(lists) > limit:
        raise InputError(
            f"`input` holds {len(lists)} items; at most {limit} per request", kind="too_large", param="input"
        )
    return await asyncio.to_thread(decode_all, lists, model, setting(spec, "TIKTOKEN_DIR"))
