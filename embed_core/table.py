"""The one table that describes the six services.

Ports, class names, environment-variable names and defaults are read from here and
nowhere else: service.py builds its BentoML classes from it, the start script and the
deployment files are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# The names below are defined here once; the pieces they name (service base classes, pooling rules) are
# keyed by them, and tests/test_layers.py checks that every such map covers every name.
Kind = Literal["text_embedding", "rerank", "image_embedding"]
KINDS: tuple[str, ...] = get_args(Kind)
Quantization = Literal["none", "int8", "bnb-int8", "nf4", "fp8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
PoolingName = Literal["cls", "mean", "last"]
POOLING_NAMES: tuple[str, ...] = get_args(PoolingName)


@dataclass(frozen=True)
class ServiceSpec:
    seed_name: str  # the script name in the seed README, e.g. "qwen3_8b_embed"
    class_name: str  # `bentoml serve service:<class_name>`
    port: int
    kind: Kind
    default_model: str  # hub id, or a local path
    dimension: int | None  # output dimension of the real model (None for rerankers)
    default_quantization: Quantization
    params_billion: float  # for the VRAM estimate of a profile
    # Pooling when the model ships no sentence-transformers config of its own.
    default_pooling: PoolingName | None = None
    # How an instruction is put in front of a text: "instruct_query" (Qwen3-Embedding) or "prefix" (BGE).
    prompt: Literal["instruct_query", "prefix"] | None = None
    default_instruction: str | None = None
    # Smallest Matryoshka dimension the model was trained for; None = `dimensions` not supported.
    matryoshka_min_dim: int | None = None
    default_max_length: int = 512
    # Another service whose loaded model this one may run on (same checkpoint: one copy of the weights; see
    # embed_http/shared_model.py). The launcher shares it when both run on the same checkpoint and device.
    shares_model_with: str | None = None
    title: str = ""

    @property
    def env_prefix(self) -> str:
        return self.seed_name.upper()

    @property
    def model_env(self) -> str:
        return f"{self.env_prefix}_MODEL"

    @property
    def quantization_env(self) -> str:
        return f"{self.env_prefix}_QUANTIZATION"

    @property
    def model_host_env(self) -> str:
        """The address of the service whose model this one runs on (`shares_model_with`); unset: its own copy."""
        return f"{self.env_prefix}_MODEL_HOST"


RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

SERVICES: dict[str, ServiceSpec] = {
    spec.seed_name: spec
    for spec in (
        ServiceSpec(
            seed_name="siglip2_embed",
            class_name="Siglip2Embed",
            port=6010,
            kind="image_embedding",
            default_model="google/siglip2-so400m-patch16-512",
            dimension=1152,
            default_quantization="none",
            params_billion=1.14,
            default_max_length=64,
            title="SigLIP2 so400m/16 @512: image and text embeddings in one space",
        ),
        ServiceSpec(
            seed_name="qwen3_4b_embed",
            class_name="Qwen3Embed4B",
            port=6011,
            kind="text_embedding",
            default_model="Tongyi-MAI/Z-Image-Turbo",
            dimension=2560,
            default_quantization="none",
            params_billion=4.0,
            default_pooling="mean",
            prompt="instruct_query",
            default_max_length=8192,
            title="Qwen3-4B (Z-Image-Turbo text encoder) text embeddings",
        ),
        ServiceSpec(
            seed_name="bge_embed",
            class_name="BgeEmbed",
            port=6012,
            kind="text_embedding",
            default_model="BAAI/bge-large-zh-v1.5",
            dimension=1024,
            default_quantization="none",
            params_billion=0.326,
            default_pooling="cls",
            prompt="prefix",
            default_max_length=512,
            title="BGE-large-zh-v1.5 text embeddings",
        ),
        ServiceSpec(
            seed_name="qwen3_4b_rerank",
            class_name="Qwen3Rerank4B",
            port=6013,
            kind="rerank",
            default_model="Tongyi-MAI/Z-Image-Turbo",
            dimension=None,
            default_quantization="none",
            params_billion=4.0,
            default_instruction=RERANK_INSTRUCTION,
            default_max_length=8192,
            shares_model_with="qwen3_4b_embed",
            title="Qwen3-4B (Z-Image-Turbo text encoder) LLM-logit reranker",
        ),
        ServiceSpec(
            seed_name="qwen3_8b_embed",
            class_name="Qwen3Embed8B",
            port=6014,
            kind="text_embedding",
            default_model="Qwen/Qwen3-Embedding-8B",
            dimension=4096,
            default_quantization="int8",
            params_billion=8.0,
            default_pooling="last",
            prompt="instruct_query",
            matryoshka_min_dim=32,
            default_max_length=8192,
            title="Qwen3-Embedding-8B text embeddings",
        ),
        ServiceSpec(
            seed_name="qwen3_8b_rerank",
            class_name="Qwen3Rerank8B",
            port=6015,
            kind="rerank",
            default_model="Qwen/Qwen3-Reranker-8B",
            dimension=None,
            default_quantization="int8",
            params_billion=8.0,
            default_instruction=RERANK_INSTRUCTION,
            default_max_length=8192,
            title="Qwen3-Reranker-8B reranker",
        ),
    )
}


def spec_for(seed_name: str) -> ServiceSpec:
    try:
        return SERVICES[seed_name]
    except KeyError:
        raise KeyError(f"unknown service {seed_name!r}; known: {', '.join(SERVICES)}") from None
