"""The OpenAPI document (GET /docs.json) as the APIs really answer, and request tracing."""

from __future__ import annotations

import copy
import typing as t

import bentoml

from embed_http.registry import Routing
from embed_http.tei import TEI_ERROR_SCHEMA

# The body of every error answer: ours ({"error", "param"}) and BentoML's validation 400s ({"error", "detail"}).
ERROR_SCHEMA: dict[str, t.Any] = {
    "type": "object",
    "title": "ErrorResponse",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what is wrong, for a person to read"},
        "param": {"type": "string", "description": "the request field at fault, e.g. `texts[3]`"},
        "detail": {
            "type": "array",
            "items": {"type": "object"},
            "description": "pydantic's list of validation errors (malformed JSON, wrong types, missing fields)",
        },
    },
}
ERROR_ANSWERS: dict[int, str] = {
    400: "Bad input: malformed JSON, a wrong type, a missing field, an empty text, an option out of range",
    413: "More items than the service takes in one request, or a body over <NAME>_MAX_REQUEST_MB",
    415: "The body is not JSON (send Content-Type: application/json), nor a form where the API takes one",
    503: "Overloaded: the input does not fit in device memory even alone",
}


def record_spans_only_when_exported() -> None:
    """With no tracing exporter configured, request spans are created non-recording.

    BentoML records a span for every request even then (its sampler keeps unsampled spans as
    RECORD_ONLY), and building them took much of the event loop's CPU time under load (BENCHMARKS.md,
    "no recorded spans"). Non-recording spans still get fresh
    trace and span ids, which the access log prints. A configured exporter (`tracing.exporter_type`)
    leaves BentoML's own sampling in place. service.py calls it when it is imported: before the server
    builds its middleware, which takes the provider once.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    if BentoMLContainer.config.tracing.exporter_type.get() is None:
        BentoMLContainer.tracer_provider.set(TracerProvider(sampler=ALWAYS_OFF))


class DocumentedService(bentoml.Service):
    """A BentoML service whose OpenAPI document (GET /docs.json) declares what its APIs really answer.

    BentoML declares the same three errors for every API, with a `detail` string where its own
    validation 400s send a list, and it drops `null` from optional fields. Here each API route
    declares the error answers it gives (ERROR_ANSWERS, all with ERROR_SCHEMA), and the optional
    fields are `nullable`, as the pydantic signature accepts. The routes of the other protocols that declare
    their operations (TEI's: embed_http/tei.py) are added from the registry; on a path the seed's API shares with
    one (/rerank), the request and the answer are either protocol's (oneOf), told apart by the body.
    """

    routing: Routing | None = None  # set by service.py: the protocols this service speaks

    @property
    def openapi_spec(self) -> t.Any:
        spec = super().openapi_spec
        spec.components["schemas"]["ErrorResponse"] = ERROR_SCHEMA
        error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for api in self.apis.values():
            operation = spec.paths[api.route].post
            for status, description in ERROR_ANSWERS.items():
                operation["responses"][status] = {"description": description, "content": error_content}
            nullable = _nullable_fields(api.input_spec.model_json_schema())
            for media in operation["requestBody"]["content"].values():
                for name, field in (media.schema.properties or {}).items():
                    if name in nullable:
                        field["nullable"] = True
        if self.routing is not None:
            self._declare_protocol_routes(spec, self.routing)
        return spec

    @staticmethod
    def _declare_protocol_routes(spec: t.Any, routing: Routing) -> None:
        from bentoml._internal.service.openapi.specification import PathItem

        for _, endpoint in routing.endpoints():
            if endpoint.operation is None:
                continue
            spec.components["schemas"]["TeiErrorResponse"] = TEI_ERROR_SCHEMA
            method = endpoint.method.lower()
            if endpoint.path not in spec.paths:
                spec.paths[endpoint.path] = PathItem(**{method: copy.deepcopy(endpoint.operation)})
                continue
            # A path the seed's API holds too: either protocol's request, either's answer.
            seed, other = getattr(spec.paths[endpoint.path], method), endpoint.operation
            for media_type, media in seed["requestBody"]["content"].items():
                other_schema = other["requestBody"]["content"]["application/json"]["schema"]
                seed["requestBody"]["content"][media_type] = {"schema": {"oneOf": [media.schema, other_schema]}}
            for status, answer in other["responses"].items():
                declared = seed["responses"].get(int(status)) or seed["responses"].get(status)
                if declared is None:
                    seed["responses"][int(status)] = answer
                    continue
                ours = _json_schema(declared)
                if ours is not None:
                    declared["content"] = {"application/json": {"schema": {"anyOf": [ours, _json_schema(answer)]}}}


def _json_schema(response: t.Any) -> t.Any:
    content = response.get("content") if isinstance(response, dict) else getattr(response, "content", None)
    media = (content or {}).get("application/json")
    if media is None:
        return None
    return media.get("schema") if isinstance(media, dict) else media.schema


def _nullable_fields(schema: dict[str, t.Any]) -> set[str]:
    return {
        name
        for name, field in schema.get("properties", {}).items()
        if any(option.get("type") == "null" for option in field.get("anyOf", []))
    }
