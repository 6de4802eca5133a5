"""WorldKV connector glue for real vLLM (optional dependency)."""
