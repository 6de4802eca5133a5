"""Hosts of the connector: the video backend (integration.video) and real vLLM (integration.vllm)."""
