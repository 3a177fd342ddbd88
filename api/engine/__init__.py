"""Engine-core process plumbing for `fornax serve`: the process, its launcher, its client."""
