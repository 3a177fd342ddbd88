"""Test helpers: a real server subprocess, speech fixtures, GPU-shaped checkpoints, a flashinfer stand-in, the fuzzing campaign."""
