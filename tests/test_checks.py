"""check_int: the one "an int but not a bool" check behind every config field and launcher argument."""
from __future__ import annotations

import re

import numpy as np
import pytest

from worldkv_connector.checks import check_int, is_int


def test_ints_and_numpy_integers_pass_as_python_ints():
    assert check_int("KVShape.head_dim", 128, lo=1) == 128
    value = check_int("KVShape.head_dim", np.int64(64), lo=1, hi=256)
    assert value == 64 and type(value) is int
    assert check_int("offset", -5) == -5  # no bounds: any int
    assert is_int(np.uint8(3)) and is_int(0)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, "3", None, np.float32(1)])
def test_bools_and_non_integers_are_refused_with_the_field_value_and_type(value):
    assert not is_int(value)
    with pytest.raises(ValueError, match=rf"KVShape.head_dim={re.escape(repr(value))} has the wrong type: expected an int "
                                         rf"\(head_dim >= 1\), got {type(value).__name__}"):
        check_int("KVShape.head_dim", value, lo=1)


def test_out_of_range_names_the_bounds():
    with pytest.raises(ValueError, match=r"^TransferEngine num_streams=0 is out of range: allowed 1 <= num_streams <= 64$"):
        check_int("TransferEngine num_streams", 0, lo=1, hi=64)
    with pytest.raises(ValueError, match=r"^seed=-1 is out of range: allowed seed >= 0$"):
        check_int("seed", -1, lo=0)
    with pytest.raises(ValueError, match=r"^WorldConfig.rows=2000 is out of range: allowed rows <= 1024$"):
        check_int("WorldConfig.rows", 2000, hi=1024)
    assert check_int("TransferEngine num_streams", 64, lo=1, hi=64) == 64  # bounds are inclusive
