"""A small Python client for the six services, mirroring the seed README's example functions.

    from embed_client import EmbedClient

    text_8b = EmbedClient("http://localhost:6014")
    vector = text_8b.get_embedding("一只可爱的猫")
    reranker = EmbedClient("http://localhost:6015")
    for hit in reranker.rerank("橙色猫", ["橙猫晒太阳", "黑狗跑步", "白猫睡觉"], top_k=2):
        print(hit.original_index, hit.score, hit.document)

Every call has a timeout; a 503 (the model is overloaded) or 429 is retried with exponential backoff
(honouring Retry-After), as are connection failures; anything else fails at once with an exception
that carries the service's own error message.
"""

from .client import (
    BadRequest,
    EmbedClient,
    EmbedClientError,
    RerankHit,
    ServiceBusy,
    ServiceError,
    Unauthorized,
    Unreachable,
    embed_image,
    embed_texts,
    get_embedding,
    rerank,
    score,
)
from .index import FileError, IndexReport, index_folder
from .search import SearchHit, search
from .store import PhotoStore

__all__ = [
    "BadRequest",
    "EmbedClient",
    "EmbedClientError",
    "FileError",
    "IndexReport",
    "PhotoStore",
    "RerankHit",
    "SearchHit",
    "ServiceBusy",
    "ServiceError",
    "Unauthorized",
    "Unreachable",
    "embed_image",
    "embed_texts",
    "get_embedding",
    "index_folder",
    "rerank",
    "score",
    "search",
]
