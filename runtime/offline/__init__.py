"""The offline Python API: LLM (generate, chat, beam search, pooling) and SpeechToText, in one process."""
