"""SigLIP / SigLIP2 runner: images and texts into one vector space, through the model's two towers.

Recipe (the model card's): images through the checkpoint's own image processor; texts lower-cased,
padded to exactly `max_length` (64) tokens at the end, the way the model was trained; then
`get_image_features` / `get_text_features`, L2-normalized. A match score is SigLIP's own sigmoid,
sigmoid(cosine * exp(logit_scale) + logit_bias).

Images are decoded and resized in a small thread pool, off the event loop; the prepared pixels of
concurrent requests then share forward passes through one Batcher (texts go through the same queue,
so the model only ever runs on one thread).
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch

from embed_core.config import RunnerConfig
from embed_core.errors import InputError, ModelLoadError
from embed_core.table import ServiceSpec

from .batching import Batcher, plan_micro_batches, run_in_order, runner_batcher
from .contract import ImageSource
from .gpu_decode import GpuJpegDecoder
from .images import ImageSettings, accepted_formats, bytes_from_base64, open_image
from .loading import MAX_CHARS_PER_TOKEN, load_image_processor, prepare_model
from .pooling import check_dimensions

log = logging.getLogger(__name__)

# The text tower's inputs we pass on; a tokenizer may return more (token_type_ids) that SigLIP does not take.
_TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class FixedSizePixels:
    """The image processor's own steps for fixed-resolution checkpoints (resize to one size, rescale,
    normalize), split so that only the resize runs in the decode threads and the float arithmetic
    runs on the device, for the whole batch at once. Same numbers as the processor's PIL path.

    Used only when the processor does exactly those steps; anything else (NaFlex, crops, padding)
    goes through the processor itself.
    """

    width: int
    height: int
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: Any) -> FixedSizePixels | None:
        config = processor.to_dict()
        size = config.get("size") or {}
        plain = (
            set(size) == {"height", "width"}
            and all(config.get(step) for step in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
            and not any(
                config.get(step) for step in ("do_center_crop", "do_pad", "max_num_patches", "do_reduce_labels")
            )
            and len(config.get("image_mean") or ()) == 3
            and len(config.get("image_std") or ()) == 3
        )
        if not plain:
            return None
        return cls(
            width=int(size["width"]),
            height=int(size["height"]),
            resample=int(config.get("resample", 3)),
            rescale_factor=float(config["rescale_factor"]),
            mean=tuple(config["image_mean"]),
            std=tuple(config["image_std"]),
        )

    def resize(self, image: Any) -> torch.Tensor:
        """RGB picture -> uint8 [1, 3, height, width]."""
        import numpy as np

        resized = image.resize((self.width, self.height), resample=self.resample)
        return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).unsqueeze(0)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, h, w] on the device -> float32, rescaled and normalized as the processor does."""
        mean = torch.tensor(self.mean, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
        return (pixels.float() * self.rescale_factor - mean) / std


@dataclass(frozen=True)
class PreparedImage:
    """One image as the vision tower takes it: the processor's tensors, batch dimension 1."""

    inputs: dict[str, torch.Tensor]


Item = Union[str, PreparedImage]  # a text, or a prepared image


def features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a BaseModelOutputWithPooling in 5
    (the projected features are its pooler_output)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"unexpected feature output {type(output).__name__} without pooler_output")
    return pooled


class SiglipEmbedder:
    # What a service may read while the model is unloaded (runners/idle.py): plain facts, no model or processor.
    KEPT_WHEN_UNLOADED: ClassVar[frozenset[str]] = frozenset(
        {"spec", "config", "settings", "model_name", "dimension", "max_length", "scale", "bias"}
    )

    def __init__(
        self, spec: ServiceSpec, config: RunnerConfig | None = None, settings: ImageSettings | None = None
    ) -> None:
        self.spec = spec
        self.config = config or RunnerConfig.from_env(spec)
        self.settings = settings or ImageSettings.from_env(spec)
        parts = prepare_model(self.config)
        self.model_name = str(parts.files.root)
        self.device, self.dtype, self.tokenizer = parts.device, parts.dtype, parts.tokenizer
        self.image_processor = load_image_processor(parts.files, self.config)
        self.fixed_size = FixedSizePixels.from_processor(self.image_processor)
        self.gpu_jpeg = GpuJpegDecoder.for_service(self.settings, self.device, self.fixed_size)
        self.model = parts.load_model(self.config)
        for needed in ("get_image_features", "get_text_features", "logit_scale", "logit_bias"):
            if not hasattr(self.model, needed):
                raise ModelLoadError(
                    f"{self.config.model_env}={self.model_name!r} is a {type(self.model).__name__}, "
                    f"not a SigLIP-style image-text model (it has no {needed})"
                )
        self.dimension = self._dimension()
        self.max_length = self._max_length()
        self.compiled = self._compile_vision_tower()
        # SigLIP scores a pair as sigmoid(cosine * scale + bias); the model stores log(scale).
        self.scale = math.exp(float(self.model.logit_scale.detach().float().cpu().reshape(-1)[0]))
        self.bias = float(self.model.logit_bias.detach().float().cpu().reshape(-1)[0])
        self.settings.limits.apply_to_pillow()
        self._decoders = ThreadPoolExecutor(
            max_workers=self.settings.decode_threads, thread_name_prefix=f"{spec.seed_name}-decode"
        )
        # Each result is (vector, tokens read): the token count of a text, 0 for an image.
        self.image_tokens = self._image_tokens()
        self.batcher: Batcher[Item, tuple[torch.Tensor, int]] = runner_batcher(
            self._embed_batch, spec, self.config, cost=self._cost
        )
        if spec.dimension is not None and spec.dimension != self.dimension:
            log.warning(
                "%s: model has dimension %d, the table expects %d", spec.seed_name, self.dimension, spec.dimension
            )

    # -- what the service asks -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        limits = self.settings.limits
        return {
            "model": self.model_name,
            "architecture": type(self.model).__name__,
            "dimension": self.dimension,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.config.quantization,
            "max_length": self.max_length,
            "truncation": "texts longer than max_length tokens are cut at the end",
            "compiled": self.compiled,
            "scale": self.scale,
            "bias": self.bias,
            "image_formats": accepted_formats(),
            "gpu_decode": self.gpu_jpeg is not None,
            "max_image_bytes": limits.max_bytes,
            "max_image_pixels": limits.max_pixels,
            "max_images_per_request": self.settings.max_images_per_request,
            "max_items_per_request": self.config.max_items_per_request,
        }

    def check_image_count(self, count: int, param: str) -> None:
        if count == 0:
            raise InputError(f"`{param}` must hold at least one image", param=param)
        limit = self.settings.max_images_per_request
        if count > limit:
            raise InputError(
                f"`{param}` holds {count} images; at most {limit} per request", kind="too_large", param=param
            )

    async def embed_images(self, sources: list[ImageSource], names: list[str] | None = None) -> list[list[float]]:
        """L2-normalized image embeddings, in input order. `names` name the inputs in error messages."""
        prepared = await self.prepare_images(sources, names)
        return torch.stack([vector for vector, _ in await self.batcher.submit(list(prepared))]).tolist()

    async def embed_texts(self, texts: list[str]) -> list[list[float]]:
        """L2-normalized text embeddings, in input order, from the text tower."""
        vectors, _ = await self.embed_counted(texts)
        return vectors

    def check_dimensions(self, dimensions: int | None) -> int:
        """SigLIP vectors are not Matryoshka-trained: only the full dimension is served."""
        return check_dimensions(dimensions, self.dimension, self.dimension)

    async def embed_counted(
        self, texts: list[str], instruction: str | None = None, dimensions: int | None = None
    ) -> tuple[list[list[float]], int]:
        """Text-tower embeddings plus the number of real tokens read (padding not counted), as the text
        runner's embed_counted; SigLIP takes no instruction."""
        if instruction:
            raise InputError("SigLIP takes no instruction; send the text alone", param="instruction")
        self.check_dimensions(dimensions)
        results = await self.batcher.submit(list(texts))
        return torch.stack([vector for vector, _ in results]).tolist(), sum(tokens for _, tokens in results)

    async def similarity(
        self, text: str, sources: list[ImageSource], names: list[str] | None = None
    ) -> list[dict[str, float]]:
        """For each image, in input order: its cosine with the text, and SigLIP's probability that they match."""
        prepared = await self.prepare_images(sources, names)
        text_vector, *image_vectors = (vector for vector, _ in await self.batcher.submit([text, *prepared]))
        cosines = torch.stack(image_vectors).double() @ text_vector.double()
        scores = torch.sigmoid(cosines * self.scale + self.bias)
        return [
            {"index": index, "score": float(score), "cosine": float(cosine)}
            for index, (score, cosine) in enumerate(zip(scores, cosines, strict=True))
        ]

    async def prepare_images(self, sources: list[ImageSource], names: list[str] | None = None) -> list[PreparedImage]:
        """Decode and preprocess in the decode threads; the first bad image (by position) fails the request."""
        loop = asyncio.get_running_loop()
        names = names or [f"images[{index}]" for index in range(len(sources))]
        if self.gpu_jpeg is not None:  # JPEGs on the GPU in one batch, the rest through prepare_image
            done = await self.gpu_jpeg.prepare(sources, names, self._decoders, self.prepare_image)
            return [item if isinstance(item, PreparedImage) else PreparedImage({"pixel_values": item}) for item in done]
        results = await asyncio.gather(
            *(
                loop.run_in_executor(self._decoders, self.prepare_image, source, name)
                for source, name in zip(sources, names, strict=True)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    def prepare_image(self, source: ImageSource, param: str = "image") -> PreparedImage:
        """bytes or base64 -> RGB picture -> the processor's tensors (resize, rescale, normalize)."""
        limits = self.settings.limits
        data = bytes_from_base64(source, limits, param) if isinstance(source, str) else source
        if self.fixed_size is not None:  # decoded no larger than needed; rescale and normalize on the device
            image = open_image(data, limits, param, fit=(self.fixed_size.width, self.fixed_size.height))
            return PreparedImage({"pixel_values": self.fixed_size.resize(image)})
        image = open_image(data, limits, param)
        inputs = self.image_processor(images=[image], return_tensors="pt")
        return PreparedImage({key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)})

    # -- the model side (runs in the batcher's worker thread) ------------------------------------------

    def _cost(self, item: Item) -> int:
        """The queue's cost of an item in tokens: a text is padded to max_length, an image is its patches."""
        return self.max_length if isinstance(item, str) else self.image_tokens

    def _image_tokens(self) -> int:
        vision = self.model.config.vision_config
        patches = getattr(vision, "num_patches", None)  # SigLIP2 (NaFlex) names it; SigLIP has a fixed square
        return int(patches or (vision.image_size // vision.patch_size) ** 2)

    def _embed_batch(self, items: list[Item]) -> list[tuple[torch.Tensor, int]]:
        """Texts and images of one batch, each kind in its own passes; the results in the items' order."""
        results: dict[int, tuple[torch.Tensor, int]] = {}
        texts = [(index, item) for index, item in enumerate(items) if isinstance(item, str)]
        images = [(index, item) for index, item in enumerate(items) if isinstance(item, PreparedImage)]
        if texts:
            encoded = self._tokenize([text for _, text in texts])
            lengths = self._real_lengths(encoded["input_ids"])

            def text_pass(part: list[int]) -> list[torch.Tensor]:
                vectors = list(self._forward_text({key: value[part] for key, value in encoded.items()}))
                real = sum(lengths[i] for i in part)
                self.batcher.forward_done("text", len(part), real, len(part) * self.max_length)
                return vectors

            plan = plan_micro_batches([self.max_length] * len(texts), self.config.max_batch_tokens)
            vectors = run_in_order(plan, text_pass, len(texts))
            for (index, _), vector, length in zip(texts, vectors, lengths, strict=True):
                results[index] = (vector, length)
        if images:

            def image_pass(part: list[int]) -> list[torch.Tensor]:
                vectors = list(self._forward_images([images[i][1] for i in part]))
                self.batcher.forward_done("image", len(part))
                return vectors

            plan = plan_micro_batches([1] * len(images), self.settings.max_batch_images)
            vectors = run_in_order(plan, image_pass, len(images))
            for (index, _), vector in zip(images, vectors, strict=True):
                results[index] = (vector, 0)
        return [results[index] for index in range(len(items))]

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # Lower-cased: the model was trained on lower-cased text. Padded at the end to exactly max_length:
        # SigLIP pools the last position and was trained so (Gemma's tokenizer pads on the left by default).
        # Cut first, as the text runner does: a 10 MB text is not tokenized whole to keep max_length tokens.
        longest = self.max_length * MAX_CHARS_PER_TOKEN
        encoded = self.tokenizer(
            [text[:longest].lower() for text in texts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        return {key: value for key, value in encoded.items() if key in _TEXT_INPUTS}

    def _real_lengths(self, input_ids: torch.Tensor) -> list[int]:
        """Tokens of each text before its padding (SigLIP reads all max_length positions; usage counts these)."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            return [input_ids.shape[1]] * input_ids.shape[0]
        return (input_ids != pad_id).sum(dim=1).tolist()

    @torch.inference_mode()
    def _forward_text(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {key: value.to(self.device) for key, value in encoded.items()}
        return self._normalized(self.model.get_text_features(**inputs))

    @torch.inference_mode()
    def _forward_images(self, images: list[PreparedImage]) -> torch.Tensor:
        return self._normalized(self.model.get_image_features(**self.model_inputs(images)))

    def model_inputs(self, images: list[PreparedImage]) -> dict[str, torch.Tensor]:
        """The vision tower's inputs for a batch of prepared images, on the device."""
        inputs = {}
        for key in images[0].inputs:
            # GPU-decoded pixels are on the device already, the CPU path's not: move each, then join.
            stacked = torch.cat([image.inputs[key].to(self.device) for image in images])
            if key == "pixel_values" and stacked.dtype == torch.uint8:
                assert self.fixed_size is not None
                stacked = self.fixed_size.normalize(stacked)
            inputs[key] = stacked.to(self.dtype) if stacked.is_floating_point() else stacked
        return inputs

    @staticmethod
    def _normalized(output: Any) -> torch.Tensor:
        return torch.nn.functional.normalize(features(output).float(), dim=-1).cpu()

    # -- start-up decisions ------------------------------------------------------------------------

    def _compile_vision_tower(self) -> bool:
        """torch.compile the vision tower (it fuses the norms, GELU and residual adds around the matmuls) and
        compile it now, on two blank images, so the first request does not pay for it. Eager on failure."""
        if self.fixed_size is None or not self.config.compiles_on(self.device):
            return False
        eager = self.model.vision_model
        self.model.vision_model = torch.compile(eager, dynamic=True)
        blank = torch.zeros((2, 3, self.fixed_size.height, self.fixed_size.width), dtype=torch.uint8)
        try:
            self._forward_images(
                [PreparedImage({"pixel_values": blank[:1]}), PreparedImage({"pixel_values": blank[1:]})]
            )
        except Exception as exc:  # torch.compile raises many kinds of errors
            log.warning(
                "torch.compile of the vision tower failed (%s: %s); running it eagerly", type(exc).__name__, exc
            )
            self.model.vision_model = eager
            return False
        return True

    def _dimension(self) -> int:
        config = self.model.config
        vision = int(config.vision_config.hidden_size)
        text = int(getattr(config.text_config, "projection_size", None) or config.text_config.hidden_size)
        if vision != text:
            raise ModelLoadError(
                f"{self.config.model_env}: image vectors have {vision} dimensions but text vectors {text}; "
                "they must share one space"
            )
        return vision

    def _max_length(self) -> int:
        positions = int(getattr(self.model.config.text_config, "max_position_embeddings", 0) or 0)
        wanted = self.config.max_length or self.spec.default_max_length
        return min(wanted, positions) if positions else wanted

    def close(self) -> None:
        self.batcher.close()
        self._decoders.shutdown(wait=False, cancel_futures=True)
