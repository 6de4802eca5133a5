"""A vLLM-like engine for causal video DiTs with a paged KV cache."""
