"""One copy of a checkpoint behind two services: the HTTP link between a service that holds a model and one that
shares it (runners/forward.py says what a pass is).

The table names which service may share whose model (`ServiceSpec.shares_model_with`: the 4B reranker, the 4B
embedding service's Qwen3-4B). With `<NAME>_MODEL_HOST` set to that service's address, the sharing service loads
the tokenizer and configuration alone, and sends each forward pass (token ids in; two logits per pair out) to
POST /shared/forward there. Everything else (validation, prompts, tokenization, batching, every route and
answer) stays its own, so a client cannot tell. `start_embed_server.sh` sets the address when both services run
on the same checkpoint, quantization and device.
"""

from __future__ import annotations

import os
import typing as t
from collections.abc import Sequence

import httpx
from pydantic import BaseModel

from embed_core.config import setting
from embed_core.errors import ModelLoadError, Overloaded
from embed_core.table import SERVICES, ServiceSpec

if t.TYPE_CHECKING:
    import torch

SHARED_FORWARD_ROUTE = "/shared/forward"
CONNECT_TIMEOUT_S = 5.0
PASS_TIMEOUT_S = 600.0  # a pass may take as long as a request may (service.py's traffic timeout)
RETRY_AFTER_S = 5  # what a request is told to wait when the shared model does not answer


class SharedForwardResponse(BaseModel):
    values: list[list[float]]  # per sequence: its pooled state, or the logits of the rows asked for
    positions: int  # positions computed (the padding metric of the sharing service)


def model_host(spec: ServiceSpec) -> str | None:
    """`<NAME>_MODEL_HOST`, checked: only a service the table lets share a model may set it (no EMBED_ fallback:
    the address is one service's)."""
    url = os.environ.get(spec.model_host_env, "").strip()
    if not url:
        return None
    if spec.shares_model_with is None:
        sharing = [name for name, other in SERVICES.items() if other.shares_model_with]
        raise ModelLoadError(
            f"{spec.model_host_env} is set, but {spec.seed_name} cannot share another service's model; "
            f"only {', '.join(sharing)} can"
        )
    if not url.startswith(("http://", "https://")):
        raise ModelLoadError(f"{spec.model_host_env}={url!r} must be an http:// or https:// address")
    return url.rstrip("/")


class SharedModelClient:
    """A ModelForward (runners/forward.py) that runs each pass on the service holding the model. Called from the
    runner's queue thread, one pass at a time."""

    def __init__(self, spec: ServiceSpec, url: str, model: str, quantization: str) -> None:
        host = SERVICES[t.cast(str, spec.shares_model_with)]
        self.host_name, self.url, self.model, self.quantization = host.seed_name, url, model, quantization
        self._checked = False
        key = setting(host, "API_KEY")  # the key the holding service asks for, if any
        self._client = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(PASS_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )

    def describe(self) -> dict[str, t.Any]:
        return {"weights": f"shared with {self.host_name} at {self.url}", "device": f"that of {self.host_name}"}

    def run(
        self, batch: Sequence[Sequence[int]], pooling: str, vocabulary_rows: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, int]:
        import torch

        body = {"token_ids": [list(ids) for ids in batch], "pooling": pooling}
        if vocabulary_rows is not None:
            body["vocabulary_rows"] = list(vocabulary_rows)
        where = f"the shared model ({self.host_name} at {self.url})"
        try:
            if not self._checked:
                self._check_same_model(where)
            response = self._client.post(SHARED_FORWARD_ROUTE, json=body)
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: its /health was not JSON
            raise Overloaded(
                f"{where} is not answering ({type(exc).__name__}); is {self.host_name} running?",
                retry_after=RETRY_AFTER_S,
            ) from None
        if response.status_code != 200:
            retry_after = response.headers.get("Retry-After", "")
            raise Overloaded(
                f"{where} answered {response.status_code}: {_error_text(response)}",
                retry_after=int(retry_after) if retry_after.isdigit() else RETRY_AFTER_S,
            )
        answer = SharedForwardResponse.model_validate_json(response.content)
        return torch.tensor(answer.values, dtype=torch.float32), answer.positions

    def _check_same_model(self, where: str) -> None:
        """Once: the holding service must serve this service's checkpoint, quantized alike, or every score would be
        another model's. (The launcher shares only then; this catches an address set by hand.)"""
        held = self._client.get("/health").json()
        theirs, ours = (held.get("model"), held.get("quantization")), (self.model, self.quantization)
        if theirs != ours:
            raise Overloaded(
                f"{where} holds {theirs[0]!r} ({theirs[1]}), but this service's model is {ours[0]!r} ({ours[1]}); "
                "a model is shared only between services of the same checkpoint and quantization (unset or fix "
                "the MODEL_HOST setting)"
            )
        self._checked = True

    def close(self) -> None:
        self._client.close()


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    return str(error) if error else response.text[:200]
