"""A new policy is one registered class: the config accepts its name and the index builds it from
the config, with no other module touched. The same holds for eviction and compression names."""
from __future__ import annotations

import numpy as np
import pytest

from worldkv_connector.bank.eviction import EVICTIONS, EvictionPolicy, get_eviction, register_eviction
from worldkv_connector.compression import COMPRESSIONS, compress_chunk, get_compression
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.retrieval import POLICIES, PoseIndex, RetrievalPolicy, register_policy


def _chunk(x: float, frames: int = 3) -> np.ndarray:
    pose = np.eye(4)
    pose[0, 3] = x
    return np.broadcast_to(pose, (frames, 4, 4)).copy()


def test_a_policy_registered_in_a_test_is_accepted_by_the_config_and_used_by_the_index():
    with pytest.raises(ValueError, match=r"WorldKVConfig.policy='test-farthest' is not allowed: choose one of \['fov', 'pose'\]"):
        WorldKVConfig(policy="test-farthest")

    @register_policy("test-farthest")
    class FarthestPolicy(RetrievalPolicy):
        """Farthest chunk centre first, farther than ``fov_far`` counted as ``fov_far`` (a knob
        read from the config, to show that the class builds itself from it)."""

        def __init__(self, cap: float = np.inf) -> None:
            self.cap = cap

        @classmethod
        def from_config(cls, config):
            return cls(cap=config.fov_far)

        def score(self, cand_t, cand_R, q_t, q_R, valid=None):
            out = -np.minimum(np.linalg.norm(cand_t - q_t, axis=1), self.cap)
            if valid is not None:
                out[~np.asarray(valid)] = np.inf
            return out

    try:
        config = WorldKVConfig(policy="test-farthest", fov_far=5.0)
        assert "test-farthest" in POLICIES.names()
        index = PoseIndex.from_config(config)
        assert isinstance(index.policy, FarthestPolicy) and index.policy.cap == 5.0
        assert index.policy_name == "test-farthest"
        for cid, x in enumerate([1.0, 7.0, 3.0, 6.0, 2.0]):
            index.add("s", cid, _chunk(x))
        # 7 and 6 are both capped at 5: they tie and break by id; chunk 2 (x = 3) is excluded
        assert index.query("s", _chunk(0.0), k=3, exclude=[2]) == [1, 3, 4]
    finally:
        POLICIES.unregister("test-farthest")
    with pytest.raises(ValueError, match="WorldKVConfig.policy='test-farthest' is not allowed"):
        WorldKVConfig(policy="test-farthest")


def test_the_built_in_policies_build_themselves_from_the_config():
    config = WorldKVConfig(policy="fov", fov_degrees=50.0, fov_near=0.3, fov_far=3.0)
    fov = POLICIES.get("fov").from_config(config)
    assert (fov.fov_degrees, fov.near, fov.far) == (50.0, 0.3, 3.0)
    assert POLICIES.get("pose").from_config(config) == POLICIES.get("pose")()
    index = PoseIndex(fov)  # an instance is used as is, under its registered name
    assert index.policy is fov and index.policy_name == "fov"
    with pytest.raises(ValueError, match=r"policy_kwargs \['near'\] are for a policy name"):
        PoseIndex(fov, near=1.0)


def test_a_registered_eviction_and_compression_are_valid_config_names():
    with pytest.raises(ValueError, match=r"WorldKVConfig.eviction='test-mru' is not allowed: choose one of \['fifo', 'lru'\]"):
        WorldKVConfig(eviction="test-mru")

    @register_eviction("test-mru")
    class MRUEviction(EvictionPolicy):
        def on_touch(self, key):
            self._order[key] = None
            self._order.move_to_end(key, last=False)

    COMPRESSIONS.register("test-copy")(compress_chunk)
    try:
        config = WorldKVConfig(eviction="test-mru", compression="test-copy")
        assert isinstance(get_eviction(config.eviction), MRUEviction)
        assert get_compression(config.compression) is compress_chunk
    finally:
        EVICTIONS.unregister("test-mru")
        COMPRESSIONS.unregister("test-copy")
    with pytest.raises(ValueError, match="WorldKVConfig.compression='test-copy' is not allowed"):
        WorldKVConfig(compression="test-copy")
