"""Engine-core process plumbing for `fornax serve`: the process itself, its launcher, its async client."""
