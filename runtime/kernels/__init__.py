"""fornax's native CPU kernels (C sources in csrc/), their build and their Python wrappers."""
