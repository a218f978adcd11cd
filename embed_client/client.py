"""The HTTP client of the six services (EmbedClient) and the seed README's example functions; `embed_client`
re-exports them. Its own module, so that the photo pipeline's modules import it without importing the package."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 503})


class EmbedClientError(Exception):
    """Anything that went wrong talking to a service."""


class ServiceError(EmbedClientError):
    """The service answered with an error: `status`, its `message`, and the `param` it blames (if any)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.param = status, message, param


class BadRequest(ServiceError):
    """4xx: the request itself is wrong (empty text, too many items, a bad image); retrying will not help."""


class Unauthorized(BadRequest):
    """401: the service wants `Authorization: Bearer <key>` (EMBED_API_KEY) and got none or a wrong one."""


class ServiceBusy(ServiceError):
    """503 or 429, still after every retry; `retry_after` is the service's Retry-After in seconds, if it sent one."""

    retry_after: float | None = None


class Unreachable(EmbedClientError):
    """No answer at all (connection refused, timeout), still after every retry."""


@dataclass(frozen=True)
class RerankHit:
    original_index: int
    score: float
    document: str | None = None


ImageInput = bytes | str | os.PathLike


class EmbedClient:
    """One service (one base URL). Thread-safe; reuse it, and close() it (or use `with`) when done."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries, self.backoff = retries, backoff
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers, transport=transport)

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- text embeddings (6011, 6012, 6014; SigLIP2's text tower on 6010) ---------------------------

    def get_embedding(self, text: str, instruction: str | None = None, dimensions: int | None = None) -> list[float]:
        """One text's vector (`/embed/text`)."""
        return self._post("/embed/text", {"text": text, "instruction": instruction, "dimensions": dimensions})[
            "embedding"
        ]

    def embed_texts(
        self, texts: Sequence[str], instruction: str | None = None, dimensions: int | None = None
    ) -> list[list[float]]:
        """Several texts' vectors, in input order (`/embed/texts`)."""
        body = {"texts": list(texts), "instruction": instruction, "dimensions": dimensions}
        return self._post("/embed/texts", body)["embeddings"]

    # -- images (6010) ----------------------------------------------------------------------------------

    def embed_image(self, image: ImageInput) -> list[float]:
        """One image's vector: the file's bytes, or a path to it (uploaded as a multipart file)."""
        return self._request("POST", "/embed/image", files=[_image_part("image", image)])["embedding"]

    def embed_images(self, images: Sequence[ImageInput]) -> list[list[float]]:
        """Several images' vectors, in input order. Uploaded as files, not base64 JSON: encoding a 12-MP photo's
        JSON costs this client about ten times the CPU of a multipart part (BENCHMARKS.md)."""
        if not images:
            return []  # an empty multipart body would be refused as a missing field
        parts = [_image_part("images", image) for image in images]
        return self._request("POST", "/embed/images", files=parts)["embeddings"]

    # -- reranking (6013, 6015) ---------------------------------------------------------------------------

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        instruction: str | None = None,
        return_documents: bool = True,
    ) -> list[RerankHit]:
        """The documents, best first (at most top_k), each with its P(relevant) in [0, 1]."""
        body = {
            "query": query,
            "documents": list(documents),
            "top_k": top_k,
            "instruction": instruction,
            "return_documents": return_documents,
        }
        results = self._post("/rerank", body)["results"]
        return [RerankHit(r["original_index"], r["score"], r.get("document")) for r in results]

    def score(self, query: str, document: str, instruction: str | None = None) -> float:
        """One (query, document) pair's P(relevant) in [0, 1]."""
        return self._post("/rerank/score", {"query": query, "document": document, "instruction": instruction})["score"]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health", None)

    # -- the wire ---------------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, {key: value for key, value in body.items() if value is not None})

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, files: list[tuple[str, Any]] | None = None
    ) -> Any:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, json=body, files=files)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached the service: safe to retry
                if last:
                    raise Unreachable(f"{method} {self._http.base_url}{path}: {type(exc).__name__}: {exc}") from exc
                time.sleep(self.backoff * 2**attempt)
                continue
            except httpx.TransportError as exc:  # read timeout, reset: the service may be computing it still
                raise Unreachable(f"{method} {self._http.base_url}{path}: {type(exc).__name__}: {exc}") from exc
            if response.status_code in RETRY_STATUSES and not last:
                asked = _retry_after(response)  # 0 is an answer too: try again at once
                time.sleep(self.backoff * 2**attempt if asked is None else asked)
                continue
            if response.is_success:
                return response.json()
            raise _error_for(response)
        raise AssertionError("unreachable")


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (0 to 60), or None when absent or not a number (an HTTP date is not read)."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return min(max(seconds, 0.0), 60.0) if math.isfinite(seconds) else None


def _error_for(response: httpx.Response) -> ServiceError:
    """The message from either error shape: {"error": str, "param"} or {"error": {"message", "param"}}."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message, param = response.text.strip() or response.reason_phrase, None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message, param = str(error.get("message", message)), error.get("param")
        elif error is not None:
            message, param = str(error), body.get("param")
    status = response.status_code
    if status == 401:
        return Unauthorized(status, message, param)
    if status in RETRY_STATUSES:
        busy = ServiceBusy(status, message, param)
        busy.retry_after = _retry_after(response)
        return busy
    if 400 <= status < 500:
        return BadRequest(status, message, param)
    return ServiceError(status, message, param)


def _image_part(field: str, image: ImageInput) -> tuple[str, tuple[str, bytes, str]]:
    """A multipart file part: the bytes (read once, so that a retry sends them again) under the file's name."""
    if isinstance(image, bytes):
        return field, (field, image, "application/octet-stream")
    path = Path(image)
    return field, (path.name, path.read_bytes(), "application/octet-stream")


# -- the seed README's functions, as one-liners over a default client per port ----------------------------

DEFAULT_HOST = os.environ.get("EMBED_HOST", "http://localhost")
_clients: dict[int, EmbedClient] = {}


def _client(port: int) -> EmbedClient:
    if port not in _clients:
        _clients[port] = EmbedClient(f"{DEFAULT_HOST}:{port}", api_key=os.environ.get("EMBED_API_KEY") or None)
    return _clients[port]


def get_embedding(text: str, instruction: str | None = None, *, port: int = 6014) -> list[float]:
    """The seed's get_embedding_8b: one text through Qwen3-Embedding-8B (or the service on `port`)."""
    return _client(port).get_embedding(text, instruction)


def embed_texts(texts: Sequence[str], instruction: str | None = None, *, port: int = 6014) -> list[list[float]]:
    return _client(port).embed_texts(texts, instruction)


def embed_image(image: ImageInput, *, port: int = 6010) -> list[float]:
    return _client(port).embed_image(image)


def rerank(query: str, documents: Sequence[str], top_k: int | None = None, *, port: int = 6015) -> list[RerankHit]:
    """The seed's rerank_8b: the documents best first through Qwen3-Reranker-8B (or the service on `port`)."""
    return _client(port).rerank(query, documents, top_k)


def score(query: str, document: str, *, port: int = 6015) -> float:
    return _client(port).score(query, document)
