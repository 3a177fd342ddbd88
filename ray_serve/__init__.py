"""fornax on Ray Serve: a deployment per model whose replicas each run a `fornax serve` child,
behind an OpenAI-compatible ingress (`fornax serve-ray CONFIG.yaml`; needs `fornax[ray]`)."""
