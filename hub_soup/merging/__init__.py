"""From aligned checkpoints to a soup: the plan (canonical keys and roles), the
streamed engine, the merge methods, the weight-similarity check and the side files."""
