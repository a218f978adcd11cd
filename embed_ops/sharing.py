"""Which started services share one model: a service the table lets run on another's model (the 4B reranker on
the 4B embedding service's Qwen3-4B) does so when both start together on the same checkpoint, quantization,
device and dtype. The launcher exports `<NAME>_MODEL_HOST` for it (embed_http/shared_model.py does the rest);
a value the user set, even an empty one, is left as it is, so `QWEN3_4B_RERANK_MODEL_HOST=` keeps two copies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from embed_core.config import RunnerConfig
from embed_core.table import ServiceSpec, spec_for


def runs_on_another_model(spec: ServiceSpec, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this service will run on another service's copy of its model (its `<NAME>_MODEL_HOST` is set), and so
    holds no weights of its own."""
    return bool(environ.get(spec.model_host_env, "").strip())


def same_weights(first: RunnerConfig, second: RunnerConfig) -> bool:
    """Whether two services would load the same weights the same way (one copy can then serve both)."""
    return (first.model, first.quantization, first.device, first.dtype) == (
        second.model,
        second.quantization,
        second.device,
        second.dtype,
    )


def shared_model_env(names: list[str], ports: Mapping[str, int], environ: Mapping[str, str]) -> dict[str, str]:
    """`<NAME>_MODEL_HOST` for each service among `names` that will run on another one's model. `environ` must
    already hold what the services will see (the profile's settings), as RunnerConfig reads it."""
    env = {}
    for name in names:
        spec = spec_for(name)
        host = spec.shares_model_with
        if host is None or host not in names or spec.model_host_env in environ:
            continue
        if same_weights(RunnerConfig.from_env(spec), RunnerConfig.from_env(spec_for(host))):
            env[spec.model_host_env] = f"http://127.0.0.1:{ports[host]}"
    return env
