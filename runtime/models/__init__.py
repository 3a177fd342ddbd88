"""Model implementations and the registry from HF `architectures` names to classes."""
