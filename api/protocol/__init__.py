"""Wire formats of the served APIs as msgspec structs (API workers)."""
