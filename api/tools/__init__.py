"""Tool calling: parsers of each model family's tool-call format, a registry, forced tool choice
and the chat-history rules for tool messages (API workers)."""
