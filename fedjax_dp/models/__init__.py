"""Models as pure `types.Model` functions (init/apply), one per file."""
