"""The HTTP layer: request and answer schemas, errors, middleware, the protocol routes, the OpenAPI document."""
