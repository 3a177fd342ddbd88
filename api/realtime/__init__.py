"""WS /v1/realtime: realtime speech-to-text sessions, the vLLM and OpenAI protocols (API workers)."""
