"""The text front: tokenizer, chat templates, incremental detokenization and output processing (API side)."""
