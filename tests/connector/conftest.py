"""Shared helpers of the connector tests."""
import pytest

from worldkv_connector.transfer import TransferEngine


class DelayedTransfer(TransferEngine):
    """Copies run at submit (CPU) but jobs are reported done only after ``delay`` polls."""

    def __init__(self, delay: int):
        super().__init__("cpu")
        self.delay = delay
        self._held: list[list] = []

    def poll(self):
        self._held += [[job, 0] for job in super().poll()]
        for item in self._held:
            item[1] += 1
        out = [job for job, n in self._held if n > self.delay]
        self._held = [item for item in self._held if item[1] <= self.delay]
        return out


@pytest.fixture
def delayed_transfer():
    """``delayed_transfer(delay=N)``: a CPU transfer engine whose jobs are reported done only on the
    (N+1)-th poll after they ran (the stores and loads stay in flight that long)."""
    return DelayedTransfer
