"""VideoEngine scenarios on the tiny model: windows, memory, batching, determinism, bad inputs."""
import numpy as np
import pytest
import torch

from worldkv_connector.integration.video import EngineArgs, VideoEngine
from worldkv_connector.integration.video.block_manager import KVCacheOutOfPages

TRAJ = "R_L_R_L_R_L90"


def rollout(num_chunks=6, sessions=(("a", 1),), **kwargs):
    kwargs.setdefault("kv_cache_memory", 0.01)
    with VideoEngine(model="tiny", **kwargs) as engine:
        for sid, seed in sessions:
            engine.add_session(sid, trajectory=TRAJ, num_chunks=num_chunks, seed=seed)
        per_step = []
        while engine.has_unfinished_sessions():
            per_step.append(engine.step())
        engine.block_manager.check_invariants()
        free_at_end = engine.block_manager.num_used == 0
        latents = {sid: engine.results(sid) for sid, _ in sessions}
        return latents, per_step, free_at_end, engine.metrics()


def test_full_equals_sliding_when_the_window_holds_the_rollout():
    full, _, _, _ = rollout(6, attention_window="full", num_denoising_steps=2)
    wide, _, _, _ = rollout(6, attention_window="sliding", sink_frames=3, recent_frames=15, num_denoising_steps=2)
    narrow, _, _, _ = rollout(6, attention_window="sliding", sink_frames=3, recent_frames=3, num_denoising_steps=2)
    assert len(full["a"]) == 6 and full["a"][0].shape == (3, 16, 8, 8)
    for x, y in zip(full["a"], wide["a"]):
        assert torch.equal(x, y)
    # a window that forgets changes later chunks (the window really is what attention reads)
    assert torch.equal(full["a"][2], narrow["a"][2])  # chunk 2 still sees chunks 0 and 1
    assert not torch.allclose(full["a"][5], narrow["a"][5])


def test_sliding_memory_is_flat_and_full_grows_linearly():
    _, full_steps, full_free, full_m = rollout(10, attention_window="full", num_denoising_steps=1)
    _, slide_steps, slide_free, slide_m = rollout(10, attention_window="sliding", sink_frames=3, recent_frames=6,
                                                  num_denoising_steps=1)
    full = [s[0].resident_kv_bytes for s in full_steps]
    slide = [s[0].resident_kv_bytes for s in slide_steps]
    page = full_m["page_bytes"]  # tiny: one 48-token chunk fits one 64-token page
    assert full == [page * (i + 1) for i in range(10)]
    assert slide[:4] == [page * (i + 1) for i in range(4)]  # sink 1 + recent 2 + current
    assert set(slide[3:]) == {page * 4}
    assert slide_m["peak_pages"] == 4 and full_m["peak_pages"] == 10
    assert full_free and slide_free  # every page returns to the free list when the sessions end


def test_sessions_batch_together_with_their_own_seed_and_table():
    both, steps, free, _ = rollout(4, sessions=(("a", 1), ("b", 2)), attention_window="sliding")
    alone_a, _, _, _ = rollout(4, sessions=(("a", 1),), attention_window="sliding")
    alone_b, _, _, _ = rollout(4, sessions=(("b", 2),), attention_window="sliding")
    assert all(len(s) == 2 for s in steps)  # one step = one chunk of each session, one batched forward
    for sid, alone in (("a", alone_a), ("b", alone_b)):
        for x, y in zip(both[sid], alone[sid]):
            assert (x - y).abs().max().item() < 1e-4
    assert not torch.allclose(both["a"][0], both["b"][0])  # different seeds, different noise
    again, _, _, _ = rollout(4, sessions=(("a", 1), ("b", 2)), attention_window="sliding")
    assert all(torch.equal(x, y) for x, y in zip(both["a"], again["a"]))  # deterministic
    assert free


def test_sessions_of_different_lengths_and_late_arrivals():
    with VideoEngine(model="tiny", kv_cache_memory=0.01, num_denoising_steps=1) as engine:
        engine.add_session("short", trajectory=TRAJ, num_chunks=2)
        engine.add_session("long", trajectory=TRAJ, num_chunks=4)
        assert [len(engine.step()) for _ in range(2)] == [2, 2]
        engine.add_session("late", num_chunks=1)  # static camera
        assert sorted(r.session_id for r in engine.step()) == ["late", "long"]
        out = engine.run()
        assert set(out) == {"long"} and len(engine.results("long")) == 4
        assert engine.step() == [] and engine.block_manager.num_used == 0
        m = engine.metrics()
        assert m["chunks"] == 7 and m["sessions_running"] == 0


def test_generate_runs_sessions_like_vllm_llm():
    with VideoEngine(EngineArgs(model="tiny", kv_cache_memory=0.01, num_denoising_steps=1)) as engine:
        out = engine.generate(trajectory=TRAJ, num_chunks=2, seed=4)
        assert list(out) == ["s0"] and len(out["s0"]) == 2
        out = engine.generate([{"session_id": "x", "num_chunks": 1}, {"poses": np.eye(4)[None], "num_chunks": 2}])
        assert {k: len(v) for k, v in out.items()} == {"x": 1, "s1": 2}


def test_triton_backend_matches_torch_backend():
    import importlib

    if not hasattr(importlib.import_module("worldkv_connector.kernels.paged_attention"), "paged_attention"):
        pytest.skip("the Triton paged_attention kernel is not in this build yet")
    ref, _, _, _ = rollout(2, num_denoising_steps=1)
    tri, _, _, _ = rollout(2, num_denoising_steps=1, attention_backend="triton")
    for x, y in zip(ref["a"], tri["a"]):
        assert (x - y).abs().max().item() < 1e-4


def test_short_trajectory_holds_its_last_pose():
    poses = np.repeat(np.eye(4)[None], 4, axis=0)
    poses[:, 0, 3] = np.arange(4)  # moves along x for 4 frames
    with VideoEngine(model="tiny", kv_cache_memory=0.01, num_denoising_steps=1) as engine:
        engine.add_session("a", poses=poses, num_chunks=3)
        engine.run()
        res = engine.chunk_results("a")
    assert res[0].pose[0, 3] == pytest.approx(1.0)  # frames 0, 1, 2
    assert res[1].pose[0, 3] == pytest.approx(3.0)  # frames 3, then 4 and 5 hold frame 3
    assert res[2].pose[0, 3] == pytest.approx(3.0)
    assert res[2].finished and res[0].retrieved == []


def test_checkpoint_weights_replace_random_weights(tmp_path):
    from worldkv_connector.integration.video.checkpoint import save_checkpoint
    from worldkv_connector.integration.video.models import build_model
    from worldkv_connector.integration.video.model_config import get_model_config

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(get_model_config("tiny"), seed=7), path)
    a, _, _, _ = rollout(2, seed=7, num_denoising_steps=1)
    b, _, _, _ = rollout(2, seed=0, checkpoint=str(path), num_denoising_steps=1)
    c, _, _, _ = rollout(2, seed=0, num_denoising_steps=1)
    assert all(torch.equal(x, y) for x, y in zip(a["a"], b["a"]))
    assert not torch.allclose(a["a"][0], c["a"][0])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        VideoEngine(model="nope")
    with pytest.raises(ValueError, match="attention_window"):
        EngineArgs(attention_window="local")
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        VideoEngine(model="tiny", sink_frames=4, kv_cache_memory=0.01)
    with pytest.raises(ValueError, match="unknown --kv-connector 'nope'"):
        VideoEngine(model="tiny", kv_connector="nope", kv_cache_memory=0.01)
    with pytest.raises(ValueError, match="holds no page"):
        VideoEngine(model="tiny", kv_cache_memory=1e-6)
    with VideoEngine(model="tiny", kv_cache_memory=0.0002, attention_window="full") as engine:  # 6 pages
        with pytest.raises(ValueError, match="unknown op 'X'"):
            engine.add_session("a", trajectory="R_X90", num_chunks=2)
        with pytest.raises(ValueError, match=r"shape \[F, 4, 4\]"):
            engine.add_session("a", poses=np.zeros((5, 3, 3)), num_chunks=2)
        with pytest.raises(ValueError, match="not both"):
            engine.add_session("a", trajectory=TRAJ, poses=np.eye(4)[None])
        with pytest.raises(KVCacheOutOfPages, match="raise --kv-cache-memory to at least"):
            engine.add_session("a", trajectory=TRAJ, num_chunks=24)  # full window: 24 pages > 6
        engine.add_session("a", trajectory=TRAJ, num_chunks=6)
        with pytest.raises(ValueError, match="already in use"):
            engine.add_session("a", num_chunks=1)
        engine.run()
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_rollout_matches_the_cpu_reference(backend):
    torch.backends.cudnn.allow_tf32 = False  # fp32 reference comparison: no TF32 in the patch conv
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, _, _, _ = rollout(4, attention_window="sliding", num_denoising_steps=2)
    gpu, steps, free, m = rollout(4, attention_window="sliding", num_denoising_steps=2, device="cuda",
                                  attention_backend=backend)
    for x, y in zip(cpu["a"], gpu["a"]):
        assert y.device.type == "cpu" and (x - y).abs().max().item() < 1e-3
    assert free and m["peak_pages"] == 4


# --- the window with a connector ---------------------------------------------------------------
def test_window_defaults_without_a_connector_and_from_the_worldkv_config_with_one():
    assert EngineArgs().sink_frames is None and EngineArgs().recent_frames is None  # "not given"
    with VideoEngine(model="tiny", kv_cache_memory=0.01) as engine:
        assert (engine.args.sink_frames, engine.args.recent_frames) == (3, 6)
        assert (engine.scheduler.sink_chunks, engine.scheduler.recent_chunks) == (1, 2)
    cfg = '{"sink_frames": 6, "recent_frames": 3, "bank_bytes": 4194304}'
    with VideoEngine(model="tiny", kv_cache_memory=0.01, kv_connector="worldkv", kv_connector_config=cfg) as engine:
        assert (engine.args.sink_frames, engine.args.recent_frames) == (6, 3)
        assert (engine.scheduler.sink_chunks, engine.scheduler.recent_chunks) == (2, 1)
        assert (engine.connector.config.sink_frames, engine.connector.config.recent_frames) == (6, 3)
    # the same values given twice are fine
    with VideoEngine(model="tiny", kv_cache_memory=0.01, kv_connector="worldkv", kv_connector_config=cfg,
                     sink_frames=6, recent_frames=3) as engine:
        assert engine.scheduler.sink_chunks == 2


def test_window_flags_that_disagree_with_the_connector_config_are_an_error():
    with pytest.raises(ValueError, match=r"sink_frames=6 disagrees with the engine's --sink-frames 3"):
        VideoEngine(model="tiny", kv_cache_memory=0.01, kv_connector="worldkv", sink_frames=3,
                    kv_connector_config='{"sink_frames": 6}')
    # left out of the JSON: the connector's default (6 recent frames) defines the window
    with pytest.raises(ValueError, match=r"recent_frames=6 \(its default\) disagrees with the engine's --recent-frames 9"):
        VideoEngine(model="tiny", kv_cache_memory=0.01, kv_connector="worldkv", recent_frames=9)


def test_a_connector_class_may_define_the_window():
    from worldkv_connector.connector.api import VideoKVConnector, register_connector

    @register_connector("window-test")
    class WindowConnector(VideoKVConnector):
        @classmethod
        def window_frames(cls, config_json):
            return (0, 3) if config_json == "short" else None

    with VideoEngine(model="tiny", kv_cache_memory=0.01, kv_connector="window-test",
                     kv_connector_config="short") as engine:
        assert (engine.args.sink_frames, engine.args.recent_frames) == (0, 3)
    with VideoEngine(model="tiny", kv_cache_memory=0.01, kv_connector="window-test", recent_frames=9) as engine:
        assert (engine.args.sink_frames, engine.args.recent_frames) == (3, 9)  # no say: the flags / defaults
    with pytest.raises(ValueError, match=r"recent_frames=3 disagrees with the engine's --recent-frames 9"):
        VideoEngine(model="tiny", kv_cache_memory=0.01, kv_connector="window-test", kv_connector_config="short",
                    recent_frames=9)


@pytest.mark.parametrize("flags, message", [
    (["--sink-frames", "6"], "--kv-connector-config sink_frames=3 (its default) disagrees with the engine's --sink-frames 6"),
    (["--recent-frames", "3", "--kv-connector-config", '{"recent_frames": 9}'],
     "--kv-connector-config recent_frames=9 disagrees with the engine's --recent-frames 3"),
])
def test_cli_window_flags_against_the_connector_config(capsys, flags, message):
    from worldkv_connector.cli import main

    rc = main(["generate", "--kv-connector", "worldkv", "--num-chunks", "2", "--no-progress",
               "--kv-cache-memory", "0.01", *flags])
    _, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    assert err.count("worldkv generate: error:") == 1 and message in err


def test_keep_results_false_returns_chunks_from_step_only():
    with VideoEngine(model="tiny", num_denoising_steps=1) as engine:
        engine.add_session("kept", trajectory="R30", num_chunks=3)
        engine.add_session("streamed", trajectory="R30", num_chunks=3, keep_results=False)
        streamed = []
        while engine.has_unfinished_sessions():
            streamed += [r.latents for r in engine.step() if r.session_id == "streamed"]
        assert len(streamed) == 3 and len(engine.results("kept")) == 3
        # same seed and trajectory: streaming changes what is kept, not what is generated
        assert all(torch.equal(a, b) for a, b in zip(streamed, engine.results("kept")))
        with pytest.raises(ValueError, match="keep_results=False"):
            engine.results("streamed")
        with pytest.raises(ValueError, match="keep_results"):
            engine.add_session("bad", num_chunks=1, keep_results="no")


def test_finished_sessions_are_dropped_and_ids_reused():
    with VideoEngine(model="tiny", num_denoising_steps=1, kv_connector="worldkv") as engine:
        for round_ in range(3):  # the same id three times: each run forgets the previous one
            engine.add_session("s", trajectory="R30", num_chunks=4, keep_results=False)
            with pytest.raises(ValueError, match="already in use: it is still running"):
                engine.add_session("s", trajectory="R30", num_chunks=4)
            engine.run()
            assert "s" not in engine.scheduler.sessions
        assert engine.metrics()["sessions_total"] == 3 and engine.metrics()["chunks"] == 12
        engine.add_session("kept", trajectory="R30", num_chunks=2)
        engine.run()
        with pytest.raises(ValueError, match="keeps its results"):
            engine.add_session("kept", trajectory="R30", num_chunks=2)
        engine.drop_session("kept")  # results read, id free again
        engine.add_session("kept", trajectory="R30", num_chunks=2)


def test_python_api_takes_numpy_counts_and_a_dict_config_and_refuses_nan_prompts():
    cfg = {"retrieval_chunks": 2, "hot_chunks": 2}
    with VideoEngine(model="tiny", num_denoising_steps=1, kv_connector="worldkv", kv_connector_config=cfg) as engine:
        assert engine.connector.config.retrieval_chunks == 2
        engine.add_session("a", trajectory="R30", num_chunks=np.int64(3), seed=np.int32(1))
        assert engine.scheduler.sessions["a"].num_chunks == 3
        c = engine.model_config
        bad = torch.zeros(2, c.text_dim)
        bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="not a finite number"):
            engine.add_session("b", trajectory="R30", num_chunks=2, context=bad)
    with pytest.raises(ValueError, match="without --kv-connector"):
        EngineArgs(kv_connector_config='{"keep_ration": 0.5}')
    with pytest.raises(ValueError, match="not a finite number"):
        EngineArgs(timestep_shift=float("nan"))
