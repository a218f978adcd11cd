"""The image APIs' input: the same field names from a JSON body (images in base64) or a multipart form (files)."""

from __future__ import annotations

import typing as t
from contextlib import aclosing

import bentoml
from pydantic import ConfigDict, Field, WithJsonSchema
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from embed_core.errors import InputError
from embed_http.errors import Rejected
from embed_http.schemas import NonBlankText
from runners.images import ImageSettings

# In a multipart form an image is a file part; in JSON it is base64 or a data: URI.
UploadedFile = t.Annotated[UploadFile, WithJsonSchema({"type": "string", "format": "binary"})]
ImageField = t.Union[str, UploadedFile]
ImageFields = t.Annotated[list[ImageField], Field(json_schema_extra={"minItems": 1})]
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class FormOrJSON(bentoml.IODescriptor):
    """An API input that reads the same field names from a JSON body or from a form.

    BentoML picks one of the two by the endpoint's declared types; an image endpoint must take both,
    so this input model parses forms itself and hands JSON to BentoML's own parser (whose malformed-JSON
    and wrong-type answers stay 400 with a JSON body).
    """

    # A misspelt field is refused, not dropped (in JSON by pydantic, in a form below).
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    # The form's limits (image_request_limits), given by the service as it starts (service.py finish_start_up).
    limits: t.ClassVar[dict[str, int]] = {}

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> t.Any:
        # The body's media type and size were checked before (RequestBodies, with image_request_limits).
        limits = FormOrJSON.limits
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in FORM_TYPES:
            return await super().from_http_request(request, serde)
        try:
            form = await read_form(request, content_type, limits["form_field"])
        except (MultiPartException, HTTPException) as exc:  # Starlette re-raises parser errors as a 400 HTTPException
            return cls._rejected(InputError(f"the form could not be read: {getattr(exc, 'detail', exc)}"))
        unknown = sorted(set(form.keys()) - set(cls.model_fields))
        if unknown:
            expected = ", ".join(f"`{name}`" for name in cls.model_fields)
            return cls._rejected(
                InputError(f"unknown form field `{unknown[0]}`; this API takes {expected}", param=unknown[0])
            )
        data: dict[str, t.Any] = {}
        for name, field in cls.model_fields.items():
            values = form.getlist(name)
            if values:
                is_list = t.get_origin(field.annotation) is list
                data[name] = values if is_list or len(values) > 1 else values[0]
        return cls.model_validate(data)

    @classmethod
    def _rejected(cls, error: InputError) -> t.Any:
        return cls.model_construct(**{name: Rejected(error) for name in cls.model_fields})


async def read_form(request: Request, content_type: str, max_part_size: int) -> FormData:
    """A multipart form with its files kept in memory up to `max_part_size`; a URL-encoded form as Starlette
    reads it. Starlette's own spool limit (1 MB) writes a photo to a temporary file on disk, 64 KB at a time
    through a worker thread; the body's size is capped before, so a form holds no more memory than a JSON body
    of the same images would."""
    if content_type != "multipart/form-data":
        return await request.form(max_part_size=max_part_size)
    async with aclosing(request.stream()) as stream:
        parser = MultiPartParser(request.headers, stream, max_part_size=max_part_size)
        parser.spool_max_size = max_part_size
        return await parser.parse()


class ImageInput(FormOrJSON):
    image: ImageField


class ImagesInput(FormOrJSON):
    images: ImageFields


class SimilarityInput(FormOrJSON):
    text: NonBlankText
    images: ImageFields


def image_request_limits(settings: ImageSettings) -> dict[str, int]:
    """Body and form-field sizes that can hold the allowed images (base64 is 4/3 of the bytes)."""
    encoded = settings.limits.max_bytes * 4 // 3 + 1024
    return {"form_field": encoded, "body": settings.max_images_per_request * encoded + 1024 * 1024}


async def read_image_field(value: t.Any, name: str, max_bytes: int) -> bytes | str:
    """A file part becomes its bytes (read no further than the limit); base64 text is passed on as text."""
    if isinstance(value, str):
        return value
    data = await value.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(
            f"`{name}` is over {max_bytes} bytes; at most {max_bytes} per image", kind="too_large", param=name
        )
    if not data:
        raise InputError(f"`{name}` is an empty upload", param=name)
    return data
