"""One module per endpoint family: chat, completions, pooling, audio, Anthropic, SageMaker, batch, system (API workers)."""
