"""The registry of wire protocols: which adapters there are, and which protocol a request belongs to.

Adding a protocol is one adapter module (embed_http/tei.py is the example to follow) and one line in PROTOCOLS;
service.py says which kinds of service speak it. The middleware (body checks, API key) and the error renderer ask
a service's Routing which protocol a path (and, on a path two protocols share, a body) belongs to.
"""

from __future__ import annotations

import re
import typing as t
from dataclasses import dataclass, field

from starlette.routing import compile_path

from embed_http.adapter import Adapter, Endpoint
from embed_http.cohere import COHERE
from embed_http.openai import OPENAI
from embed_http.seed import SEED
from embed_http.tei import TEI_PROTOCOL

# Every protocol besides the seed's (the BentoML APIs of service.py, and the default for any other path).
PROTOCOLS: tuple[Adapter, ...] = (OPENAI, COHERE, TEI_PROTOCOL)


@dataclass
class Routing:
    """Which protocol each route of one service belongs to: the routes of the protocols its kind speaks."""

    kind: str
    protocols: tuple[Adapter, ...]
    _routes: list[tuple[re.Pattern[str], Adapter]] = field(default_factory=list)
    _shared: dict[str, list[tuple[t.Callable[[t.Any], bool], Adapter]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for protocol in self.protocols:
            for endpoint in protocol.endpoints(self.kind):
                if endpoint.claims is not None:  # on a path the seed's API holds: told apart by the body
                    self._shared.setdefault(endpoint.path, []).append((endpoint.claims, protocol))
                else:
                    self._routes.append((compile_path(endpoint.path)[0], protocol))

    def endpoints(self) -> list[tuple[Adapter, Endpoint]]:
        return [(protocol, endpoint) for protocol in self.protocols for endpoint in protocol.endpoints(self.kind)]

    def post_paths(self) -> frozenset[str]:
        return frozenset(endpoint.path for _, endpoint in self.endpoints() if endpoint.method == "POST")

    def is_shared(self, path: str) -> bool:
        return path in self._shared

    def protocol_of(self, path: str, body: t.Any = None) -> Adapter:
        """The protocol of a request to `path`; on a shared path, of its JSON `body` (the seed's when none claims)."""
        for claims, protocol in self._shared.get(path, ()):
            if claims(body):
                return protocol
        for pattern, protocol in self._routes:
            if pattern.match(path):
                return protocol
        for protocol in self.protocols:
            if protocol.namespaces and path.startswith(protocol.namespaces):
                return protocol
        return SEED
