"""The bank's size: a default derived from the machine, bounded by what the machine has."""
import math

import pytest
import torch

from worldkv_connector.bank import Bank
from worldkv_connector.config import AUTO_BANK_SHARE, WorldKVConfig, default_bank_bytes
from worldkv_connector.machine import host_memory


def test_default_bank_bytes_is_a_share_of_available_host_memory():
    total, available = host_memory()
    a, b = WorldKVConfig(), WorldKVConfig()
    assert a == b and a.bank_bytes == default_bank_bytes("cpu")  # one value per process: configs compare equal
    assert a.bank_bytes % (1 << 20) == 0 and a.bank_bytes >= 64 << 20
    if total is not None:  # measured once, when the process made its first config: at most the share of all
        assert a.bank_bytes <= max(64 << 20, AUTO_BANK_SHARE * total)
    assert WorldKVConfig(bank_bytes=1 << 20).bank_bytes == 1 << 20  # a value given is kept


def test_nan_is_not_a_finite_number():
    with pytest.raises(ValueError, match=r"keep_ratio=nan is not a finite number"):
        WorldKVConfig(keep_ratio=math.nan)
    with pytest.raises(ValueError, match=r"fov_degrees=inf is not a finite number"):
        WorldKVConfig(fov_degrees=math.inf)


def test_a_bank_larger_than_the_machine_is_a_clear_error():
    total, _ = host_memory()
    if total is None:
        pytest.skip("this machine does not say how much memory it has (/proc/meminfo)")
    with pytest.raises(ValueError, match=r"more than this machine's .* GiB of memory and swap; lower bank_bytes"):
        Bank(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, slot_tokens=48,
             capacity_bytes=4 * total, pin=False)
