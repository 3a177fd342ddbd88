"""The encoder-decoder (Whisper) engine: its core, runner, token decoding and word alignment (engine core)."""
