"""The fuzzing campaign against real `fornax serve` processes (test and `make fuzz` process)."""
