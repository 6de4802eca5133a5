"""Test harness of the one test tree: the `cuda` marker skips with a stated reason
when no CUDA device is present; Triton kernels run under TRITON_INTERPRET=1 on the CPU."""
import os

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors through its interpreter; it must be chosen
# before triton is first imported. With a GPU the compiled kernels are what the tests check.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# One intra-op thread: the tiny test models gain nothing from more, and on a shared 2-core machine
# torch's thread pool oversubscribes the cores (tests slowed 50-100x under load with 2 threads).
torch.set_num_threads(1)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
