"""Running one API request through the engine: sampling fields, output constraints, logprob shapes, beam search (API workers)."""
