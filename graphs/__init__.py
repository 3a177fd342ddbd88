"""fornax.graphs: everything that calls torch.compile or torch.cuda.graph (engine-core process)."""
