"""Speech-to-text front end: decoding uploads, log-mel features, long-form windows (torch-free)."""
