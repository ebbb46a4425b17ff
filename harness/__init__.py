"""Test harness: markers and their requirements, tiny models, checkpoint builders, reference loaders."""
