"""Cohere's and Jina's rerank protocol: `POST /v1/rerank` (Cohere v1, Jina) and `POST /v2/rerank` (Cohere v2) on
the rerank services, for cohere.Client / ClientV2 and the Jina rerankers of LangChain and LlamaIndex. Errors are in
OpenAI's shape (with Jina's `detail`), as those clients read them; the models routes are OpenAI's (openai.py).
"""

from __future__ import annotations

import typing as t
import uuid

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request

from embed_http.adapter import Endpoint, Served, read_json
from embed_http.openai import OpenAI, model_id
from embed_http.schemas import Flag, TopK, require_items, require_positive, require_text


class DocumentObject(BaseModel):
    model_config = ConfigDict(extra="allow")  # Cohere: the other fields come back in the answer

    text: str  # pydantic takes no number or list as a string: strict as it is


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # rank_fields, max_chunks_per_doc, max_tokens_per_doc: not used

    query: str
    documents: list[t.Union[str, DocumentObject]]
    top_n: TopK = None
    return_documents: t.Optional[Flag] = None
    model: t.Optional[str] = None
    instruction: t.Optional[str] = None  # not Cohere's: the reranker's task instruction


def rerank_handler(return_documents_default: bool) -> t.Callable[[Served, Request], t.Awaitable[dict]]:
    async def rerank(served: Served, request: Request) -> dict:
        body = await read_json(request, RerankRequest)
        require_text(body.query, "query")
        require_items(body.documents, "documents", served.engine.config.max_items_per_request)
        require_positive(body.top_n, "top_n")
        texts = [doc if isinstance(doc, str) else doc.text for doc in body.documents]
        ranked = await served.engine.rank(body.query, texts, body.instruction, body.top_n)
        with_documents = return_documents_default if body.return_documents is None else body.return_documents
        results = []
        for index, score in ranked:
            result: dict[str, t.Any] = {"index": index, "relevance_score": score}
            if with_documents:
                document = body.documents[index]
                result["document"] = {"text": document} if isinstance(document, str) else document.model_dump()
            results.append(result)
        return {"id": str(uuid.uuid4()), "model": model_id(served), "results": results}

    return rerank


class Cohere(OpenAI):
    name = "cohere"
    namespaces = ()  # /v1/ and /v2/ are OpenAI's namespace; the error shape is the same

    def endpoints(self, kind: str) -> list[Endpoint]:
        if kind != "rerank":
            return []
        return [
            # Jina and Cohere v1 (`cohere.Client`) post here; documents come back unless return_documents=false.
            Endpoint("/v1/rerank", "POST", rerank_handler(return_documents_default=True)),
            # Cohere v2 (`cohere.ClientV2`) never asks for documents back.
            Endpoint("/v2/rerank", "POST", rerank_handler(return_documents_default=False)),
        ]


COHERE = Cohere()
