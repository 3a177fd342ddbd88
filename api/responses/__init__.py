"""/v1/responses: OpenAI's Responses API over chat, its item shapes, streaming events and store (API workers)."""
