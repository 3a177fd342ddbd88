"""The model runner and what it owns: input batch, device memory sizing, sleep mode (engine core)."""
