"""The HTTP server: ASGI app and routing, request/response plumbing, settings, errors, metrics, OpenAPI (API workers)."""
