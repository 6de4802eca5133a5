"""Turning WorldKV on and off in FastVideo: the one call on a VideoGenerator (through its
executor's collective_rpc, the callable and its arguments pickled as FastVideo's worker pipes do),
on a pipeline and on a stage; bad settings; LingBot-World v2 poses from poses.npy."""
from __future__ import annotations

import os
import pickle
import types

import numpy as np
import pytest
import torch

import fastvideo_drive as drive
import fastvideo_tiny as tiny
from worldkv_connector.integration.fastvideo import (
    FastVideoWorldKVConfig, disable_worldkv, enable_worldkv, install_in_worker, lingbot_latent_poses, worldkv_binding,
)
from worldkv_connector.integration.fastvideo.adapter import _lingbot_poses
from worldkv_connector.retrieval.index import PoseIndex
from worldkv_connector.retrieval.poses import yaw_matrix


class _Pipeline:
    """Stands for a ComposedPipelineBase: FastVideo pipelines expose their stages as ``stages``."""

    def __init__(self, stages):
        self.stages = stages


class _PipeExecutor:
    """Runs collective_rpc like FastVideo's MultiprocExecutor: the method and kwargs go through
    pickle (its worker pipe), then run with the worker as first argument."""

    def __init__(self, workers):
        self.workers = workers

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        method, args, kwargs = pickle.loads(pickle.dumps((method, args, kwargs or {})))
        return [method(w, *args, **kwargs) for w in self.workers]


def test_video_generator_installs_in_every_worker(fastvideo_dist):
    workers = []
    for _ in range(2):
        stage, _ = drive.causal_wan_stage(tiny.tiny_causal_wan())
        workers.append(types.SimpleNamespace(pipeline=_Pipeline([object(), stage])))
    generator = types.SimpleNamespace(executor=_PipeExecutor(workers))
    out = enable_worldkv(generator, connector={"retrieval_chunks": 2, "keep_ratio": 0.25}, sink_frames=3,
                         recent_frames=3, page_size=4)
    assert [o["stages"] for o in out] == [["causal_wan"], ["causal_wan"]]
    for w in workers:
        b = worldkv_binding(w.pipeline)
        assert b.config.worldkv_config().retrieval_chunks == 2
    disable_worldkv(generator)
    for w in workers:
        with pytest.raises(ValueError, match="not enabled"):
            worldkv_binding(w.pipeline)


def test_enabled_worker_pipeline_generates_and_disable_restores(fastvideo_dist):
    stage, args = drive.causal_wan_stage(tiny.tiny_causal_wan(local_attn_size=9, sink_size=3))
    worker = types.SimpleNamespace(pipeline=_Pipeline([stage]))
    cfg = FastVideoWorldKVConfig(connector={"retrieval_chunks": 1}, recent_frames=3, page_size=4)
    install_in_worker(worker, config=vars(cfg))
    stage.forward(drive.causal_wan_batch(5), args)
    b = worldkv_binding(stage)
    assert b.host.retrieved_log == [[], [], [], [1], [1]]
    fwd = stage.transformer.forward
    disable_worldkv(worker.pipeline)
    assert stage.transformer.forward is not fwd
    assert "forward" not in vars(stage)  # the class's method again
    assert stage._initialize_kv_cache.__name__ == "<lambda>"  # the test's own fp32 override is back
    with pytest.raises(ValueError, match="not enabled"):
        worldkv_binding(stage)


def test_enable_twice_and_unsupported_targets():
    stage, _ = drive.causal_wan_stage(tiny.tiny_causal_wan())
    enable_worldkv(stage, page_size=4)
    with pytest.raises(ValueError, match="already enabled"):
        enable_worldkv(stage, page_size=4)
    with pytest.raises(ValueError, match="no causal stage"):
        enable_worldkv(_Pipeline([object()]))
    with pytest.raises(TypeError, match="neither"):
        enable_worldkv(object())


@pytest.mark.parametrize("kwargs, field", [
    ({"sink_frames": 4}, "sink_frames"),
    ({"sink_frames": 0}, "sink_frames"),
    ({"recent_frames": -3}, "recent_frames"),
    ({"page_size": 0}, "page_size"),
    ({"model": "sora"}, "model"),
    ({"context_noise": float("nan")}, "context_noise"),
    ({"connector": {"keep_ratio": 2.0}}, "keep_ratio"),
    ({"connector": {"sink_frames": 6}}, "sink_frames"),
    ({"connector": "{not json"}, "connector"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FastVideoWorldKVConfig(**kwargs)


def test_pool_too_small_is_a_clear_error(fastvideo_dist):
    stage, args = drive.causal_wan_stage(tiny.tiny_causal_wan())
    enable_worldkv(stage, page_size=4, kv_pool_bytes=100)
    with pytest.raises(ValueError, match="kv_pool_bytes=100"):
        stage.forward(drive.causal_wan_batch(2), args)


def _yaw_c2ws(n: int, step_deg: float) -> np.ndarray:
    c2ws = np.repeat(np.eye(4)[None], n, axis=0)
    for i in range(n):
        c2ws[i, :3, :3] = yaw_matrix(i * step_deg)
        c2ws[i, :3, 3] = [0.1 * i, 0.0, 0.0]
    return c2ws


def test_lingbot_poses_from_poses_npy(tmp_path):
    c2ws = _yaw_c2ws(25, 2.0)  # 25 video frames -> 7 latent frames -> 6 (two chunks of 3)
    np.save(os.path.join(tmp_path, "poses.npy"), c2ws)
    lat = lingbot_latent_poses(c2ws, 3)
    assert lat.shape == (6, 4, 4)
    np.testing.assert_allclose(lat[0], c2ws[0], atol=1e-9)  # absolute, not relative to the first camera
    np.testing.assert_allclose(lat[:, :3, 3], np.linspace(0, 2.4, 6)[:, None] * [1, 0, 0], atol=1e-9)
    batch = types.SimpleNamespace(action_path=str(tmp_path), num_frames=21)
    args = types.SimpleNamespace(pipeline_config=types.SimpleNamespace(dit_config=types.SimpleNamespace(
        arch_config=types.SimpleNamespace(chunk_size=3))))
    got = _lingbot_poses(batch, args)  # the stage's frame cut: 21 frames -> 6 latent frames
    assert got.shape == (6, 4, 4)
    with pytest.raises(ValueError, match="action_path"):
        _lingbot_poses(types.SimpleNamespace(action_path=None, num_frames=21), args)


def test_lingbot_revisit_retrieves_by_c2w(fastvideo_dist):
    """LingBot-World v2 with absolute c2w poses: a camera that pans away and back retrieves the
    chunks of the first pass over the same view."""
    from worldkv_connector.integration.fastvideo import WorldKVBinding
    from worldkv_connector.integration.fastvideo.models import spec_for

    n = 10
    deg = [30.0 * c for c in range(5)] + [30.0 * (9 - c) - 10 for c in range(5, n)]  # away, then back
    poses = np.repeat(np.eye(4)[None], 3 * n, axis=0)
    for j in range(3 * n):
        poses[j, :3, :3] = yaw_matrix(deg[j // 3])
    m = tiny.tiny_lingbot2()
    b = WorldKVBinding(m, spec_for(m), FastVideoWorldKVConfig(connector={"retrieval_chunks": 1}, recent_frames=3,
                                                              page_size=4))
    b.install()
    caches = {"kv_cache": b.new_caches(1, torch.float32, "cpu")}
    b.set_latent_poses(poses)
    drive.run("lingbot2", m, caches, n)
    log = b.host.retrieved_log
    index = PoseIndex("pose")  # the oracle: WorldKV's score over the true poses
    hits = total = 0
    for c in range(3, n):
        index.add("s", c - 2, poses[3 * (c - 2):3 * (c - 1)])
        want = index.query("s", poses[3 * c:3 * c + 3], 1)
        hits += len(set(log[c]) & set(want))
        total += len(log[c])
    assert total == n - 3 and hits / total >= 0.9, log
    print(f"lingbot2 revisit: precision {hits}/{total}")
    assert log[6:9] == [[3], [2], [1]]  # back at 80, 50, 20 deg: the first pass's 90, 60, 30 deg chunks
    b.uninstall()
