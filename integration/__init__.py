"""Hosts of the connector: the video backend (integration.video), real vLLM (integration.vllm),
FastVideo (integration.fastvideo) and SGLang Diffusion (integration.sglang)."""

# The hosts are the subpackages, imported by name (vllm, fastvideo and sglang need their own
# installs), so nothing is imported or exported here.
__all__: list[str] = []
