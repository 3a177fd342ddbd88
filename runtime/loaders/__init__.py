"""Model loading: HF folders, GGUF files (prepared into HF folders once), dummy weights."""
