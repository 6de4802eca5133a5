"""The WorldKV connector end to end in the video engine (tiny model, CPU): exact reinsertion against
a dense replay, retrieval on a revisit trajectory, bounded device memory, compression ratios,
write-through under delayed copies, failed loads and config errors."""
import json
import logging

import numpy as np
import pytest
import torch

from worldkv_connector.compression import compress_chunk
from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.integration.video.model_runner import RowInput
from worldkv_connector.integration.video.scheduler import CONNECTOR_OWNER, EVICTED_OWNER
from worldkv_connector.kernels.paged_attention import paged_attention_torch
from worldkv_connector.retrieval.poses import chunk_poses
from worldkv_connector.retrieval.trajectory import parse_trajectory, trajectory_poses
from worldkv_connector.rope import rotate_temporal
from worldkv_connector.testing import submit_each_layer
from worldkv_connector.transfer import TransferEngine

PS = 20  # page size: a whole tiny chunk (48 tokens) is 20 + 20 + 8, a compressed one leaves a partial page


def make_engine(steps=1, retain=True, **cfg):
    """retain: finished sessions stay banked, so the replays below can read their entries."""
    cfg.setdefault("bank_bytes", 1 << 22)
    engine = VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6, page_size=PS,
                         kv_cache_memory=0.004, num_denoising_steps=steps, kv_connector="worldkv",
                         kv_connector_config=json.dumps(cfg))
    engine.connector.retain_finished_sessions = retain
    return engine


class GarbageLoads(TransferEngine):
    """While ``fail`` is set, load jobs write garbage into their pages and report an error."""

    fail = False

    def submit_plan(self, kind, plan, **kw):
        job = super().submit_plan(kind, plan, **kw)
        if kind == "load" and self.fail:
            for d in plan.dst_views():
                d.fill_(0x7F)  # wrong data (bytes of huge floats): must never reach attention
            job.error = "RuntimeError: injected"
        return job

    def submit_layers(self, kind, plans, **kw):  # the load path's call: each layer's job as above
        return submit_each_layer(self.submit_plan, kind, plans, **kw)


def dense_replay(engine, sid, rope=False):
    """Re-run a finished session chunk by chunk with the model and dense attention over
    [sink | retrieved (read from the bank) | recent | current], the retrieved ids taken from the
    engine's results. Sink and recent K/V come from the replay's own clean passes.
    Returns (latents per chunk, committed K/V per chunk: layer -> (k, v) [T, H, D])."""
    runner, conn = engine.runner, engine.connector
    cfg, fpc = conn.config, engine.model_config.frames_per_chunk
    session = engine.scheduler.sessions[sid]
    results = engine.chunk_results(sid)
    own, outs = {}, []
    for c in range(session.num_chunks):
        sink = list(range(min(cfg.sink_chunks, c)))
        recent = list(range(max(cfg.sink_chunks, c - cfg.recent_chunks), c))
        retrieved = results[c].retrieved
        recent_start = (recent[0] if recent else c) * fpc
        state = {"clean": False}
        own[c] = {}

        def attn(layer, q, k, v):
            ks, vs = [], []
            for cid in sink:
                ks.append(own[cid][layer][0]), vs.append(own[cid][layer][1])
            for j, cid in enumerate(retrieved):
                entry = conn.worker.bank.view((sid, cid))[layer]  # [2, T', H, D]
                bk = entry[0]
                if rope:
                    target = recent_start - (len(retrieved) - j) * fpc
                    bk = rotate_temporal(bk, target - cid * fpc)
                ks.append(bk), vs.append(entry[1])
            for cid in recent:
                ks.append(own[cid][layer][0]), vs.append(own[cid][layer][1])
            if state["clean"]:
                own[c][layer] = (k[0].clone(), v[0].clone())
            kk, vv = torch.cat(ks + [k[0]]), torch.cat(vs + [v[0]])  # [N, H, D]
            n = kk.shape[0]
            table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.full((1, 1), n, dtype=torch.int32)
            return paged_attention_torch(q, kk[None], vv[None], table, lens)

        row = RowInput(sid, c, c * fpc, session.seed, session.chunk_poses[c], session.context)
        gens, lat, context, extra, offsets = runner._inputs([row])
        noise = lambda: torch.stack([torch.randn(lat, generator=g) for g in gens])  # noqa: E731
        sched = runner.schedule
        x = noise()
        sigmas = sched.sigmas
        for i, s in enumerate(sigmas):
            t = torch.full((1,), s)
            x0 = sched.predict_x0(x, runner.model(x, t, context, offsets, attn, **extra), t)
            if i + 1 < len(sigmas):
                x = sched.renoise(x0, noise(), torch.full_like(t, sigmas[i + 1]))
        state["clean"] = True
        runner.model(x0, torch.zeros(1), context, offsets, attn, **extra)
        outs.append(x0[0])
    return outs, own


@pytest.mark.parametrize("keep_ratio,rope", [(1.0, False), (0.5, False), (1.0, True)])
def test_reinsertion_equals_dense_attention_over_banked_chunks(keep_ratio, rope):
    engine = make_engine(keep_ratio=keep_ratio, rope_correction=rope, retrieval_chunks=3, hot_chunks=4)
    engine.add_session("a", trajectory="R_L_R30", num_chunks=14, seed=3)
    sessions = ["a"]
    if keep_ratio < 1:  # two sessions batched in one step: per-session banks, hot sets and windows
        engine.add_session("b", trajectory="L_R30", num_chunks=10, seed=4)
        sessions.append("b")
    engine.run()
    owns = {}
    for sid in sessions:
        results = engine.chunk_results(sid)
        assert sum(len(r.retrieved) for r in results) >= 8
        assert len({tuple(r.retrieved) for r in results}) >= 4  # the window changed along the way
        outs, owns[sid] = dense_replay(engine, sid, rope=rope)
        err = max((r.latents - o).abs().max().item() for r, o in zip(results, outs))
        assert err < 1e-5
    own = owns["a"]
    # what was banked is the (compressed) committed K/V, and kept_indices says which tokens
    conn = engine.connector
    for c in (1, 5, 9):
        ix = conn.kept_indices("a", c)
        view = conn.worker.bank.view(("a", c))
        for layer in range(2):
            k, v = own[c][layer]
            ref = compress_chunk(k, v, frame_tokens=16, keep_ratio=keep_ratio)
            assert torch.allclose(view[layer, 0], ref.k, atol=1e-5) and torch.allclose(view[layer, 1], ref.v, atol=1e-5)
            assert torch.equal(ix[layer], ref.indices)
    engine.close()


# revisits counted in latent chunks of the reference's video-frame convention (30, 26 and 19 chunks)
@pytest.mark.parametrize("spec, min_revisits", [("R_L_R_L_R_L90", 6), ("L_R_W_S_L_R90", 4), ("WSRLRL90", 1)])
def test_retrieval_on_revisit_trajectory_matches_pose_oracle(spec, min_revisits):
    engine = make_engine(keep_ratio=0.25, retrieval_chunks=4, hot_chunks=4)
    poses = chunk_poses(trajectory_poses(spec), 3)  # the whole trajectory: every spec goes and comes back
    engine.add_session("a", trajectory=spec, num_chunks=len(poses), seed=0)
    engine.run()
    hits = total = revisits = 0
    for r in engine.chunk_results("a"):
        c = r.chunk_index
        cand = [i for i in range(1, c - 2)]  # not the sink (0), not the recent window (c-2, c-1)
        if not cand:
            continue
        ct, cr = poses[cand][:, :, :3, 3].mean(1), poses[cand][:, :, :3, :3].mean(1)
        qt, qr = poses[c][:, :3, 3].mean(0), poses[c][:, :3, :3].mean(0)
        trans = ((ct - qt) ** 2).sum(-1)
        rot = np.arccos(np.clip((np.einsum("nij,ij->n", cr, qr) - 1) / 2, -1, 1))
        dist = 0.5 * trans / max(trans.max(), 1e-300) + 0.5 * rot / max(rot.max(), 1e-300)
        k = min(4, len(cand))
        oracle = {cid for cid, d in zip(cand, dist) if d <= np.sort(dist)[k - 1] + 1e-12}
        assert len(r.retrieved) == k
        hits += len(oracle.intersection(r.retrieved))
        total += k
        best = int(np.argmin(dist))
        if trans[best] < 0.05**2 and rot[best] < np.radians(8):  # a revisit: within one latent frame's turn
            revisits += 1
            assert cand[best] in r.retrieved or dist[[cand.index(g) for g in r.retrieved]].min() <= dist[best] + 1e-12
    assert revisits >= min_revisits
    assert total >= 40 and hits / total >= 0.9
    m = engine.metrics()["connector"]
    assert m["retrieval_hits"] > 0 and m["retrieval_misses"] > 0
    engine.close()


def test_resident_pages_stay_bounded_and_bank_evicts_under_capacity():
    # bank room for 10 compressed chunks of a 40-chunk rollout
    slot = 2 * 2 * 32 * 2 * 16 * 4  # K+V x layers x kept tokens (keep 0.5: 16 + 2 * 8) x heads x dim x fp32
    engine = make_engine(keep_ratio=0.5, retrieval_chunks=3, hot_chunks=5, bank_bytes=10 * slot)
    conn, bm = engine.connector, engine.block_manager
    engine.add_session("a", trajectory="R_L_R_L_R_L90", num_chunks=40, seed=0)
    full, kept = 3, 2  # pages of a whole chunk (48 tokens) and of a compressed one (32)
    # sink + recent + current, and the hot set (released chunks are freed before new loads allocate)
    during_bound = (1 + 2 + 1) * full + 5 * kept
    while engine.has_unfinished_sessions():
        (r,) = engine.step()
        assert r.resident_kv_bytes <= during_bound * engine.runner.page_bytes
        # between steps: the hot set within its budget, no evicted chunk left waiting
        assert sum(bm.holds(CONNECTOR_OWNER).values()) <= 5 * kept
        assert sum(bm.holds(EVICTED_OWNER).values()) == 0
        bank = conn.worker.bank
        assert bank.bytes_used == sum(bank.get(k).nbytes for k in bank.keys()) <= bank.capacity_bytes
        # evicted entries left the index too: every retrievable chunk is in the bank
        assert all(("a", c) in bank for c in conn.scheduler.index.chunks("a"))
    engine.drain()
    m = engine.metrics()["connector"]
    assert m["bank_evictions"] >= 25 and m["bank_entries"] == 10 and m["store_errors"] == 0
    assert m["bank_bytes"] == 10 * slot
    assert bm.num_used == 0
    bm.check_invariants()
    engine.close()


@pytest.mark.parametrize("keep_ratio,fraction", [(0.25, 1 / 2), (0.5, 2 / 3)])
def test_compression_ratio_of_bank_entries(keep_ratio, fraction):
    engine = make_engine(keep_ratio=keep_ratio, retrieval_chunks=1, hot_chunks=1)
    engine.add_session("a", num_chunks=5, seed=0)
    engine.run()
    shape, bank = engine.connector.kv_shape, engine.connector.worker.bank
    page_slack = 2 * shape.num_layers * shape.page_bytes(PS)  # one page per layer, K and V
    for c in range(5):
        assert abs(bank.get(("a", c)).nbytes - fraction * shape.chunk_bytes()) <= page_slack
    m = engine.metrics()["connector"]
    assert m["compression_ratio"] == pytest.approx(1 / fraction)
    assert "worldkv_bytes_stored_total" in engine.connector.metrics_prometheus()
    engine.close()


def test_pages_never_freed_or_reused_before_their_store_completed(delayed_transfer):
    engine = make_engine(keep_ratio=0.5, retrieval_chunks=2, hot_chunks=2)
    conn, bm = engine.connector, engine.block_manager
    conn.worker.transfer = delayed_transfer(delay=5)
    pending = {}  # (session, chunk) -> pages whose store is in flight
    build, poll = conn.build_connector_meta, conn.worker.poll
    allocate, release = bm.allocate, bm.release

    def build_spy(out):
        pending.update({(cc.session_id, cc.chunk_id): set(cc.page_ids) for cc in out.committed})
        return build(out)

    def poll_spy():
        report = poll()
        for res in report.stores:
            pending.pop(res.key)
        return report

    def busy():
        return set().union(*pending.values()) if pending else set()

    def allocate_spy(n, owner, **kw):
        pages = allocate(n, owner, **kw)
        assert not busy().intersection(pages), "a page was reused before its store completed"
        return pages

    def release_spy(pages, owner):
        freed = release(pages, owner)
        assert not busy().intersection(freed), "a page was freed before its store completed"
        return freed

    conn.build_connector_meta, conn.worker.poll = build_spy, poll_spy
    bm.allocate, bm.release = allocate_spy, release_spy
    engine.add_session("a", trajectory="R_L90", num_chunks=16, seed=0)
    engine.add_session("b", trajectory="L90", num_chunks=9, seed=1)  # ends first, while stores lag
    held = []
    while engine.has_unfinished_sessions():
        engine.step()
        held.append(sum(bm.holds(EVICTED_OWNER).values()))
    assert max(held) > 0  # evicted chunks did wait for their stores
    engine.drain()
    assert not pending and bm.num_used == 0
    assert engine.metrics()["connector"]["chunks_banked"] == 16 + 9
    engine.close()


def test_failed_load_is_dropped_logged_once_and_attention_stays_exact(caplog):
    engine = make_engine(keep_ratio=1.0, retrieval_chunks=3, hot_chunks=3)
    conn = engine.connector
    conn.worker.transfer = faulty = GarbageLoads("cpu")
    metas = []
    build = conn.build_connector_meta
    conn.build_connector_meta = lambda out: metas.append(build(out)) or metas[-1]
    engine.add_session("a", trajectory="R_L_R30", num_chunks=12, seed=5)
    failed = None
    while engine.has_unfinished_sessions():
        faulty.fail = failed is None and engine._step >= 6
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="worldkv_connector.connector"):
            (r,) = engine.step()
        if faulty.fail and metas[-1].loads:
            failed = r
            lost = {spec.key[1] for spec in metas[-1].loads}
            assert conn.get_block_ids_with_load_errors() == {p for spec in metas[-1].loads for p in spec.page_ids}
            assert not lost.intersection(r.retrieved)  # dropped from the step's window
            ours = [x for x in caplog.records if x.name.startswith("worldkv_connector.connector")]
            assert len(ours) == 1 and ours[0].levelno == logging.WARNING  # once, not per layer or pass
    assert failed is not None, "no load happened while loads were failing"
    assert engine.metrics()["connector"]["load_errors"] >= 1
    results = engine.chunk_results("a")
    outs, _ = dense_replay(engine, "a")
    err = max((r.latents - o).abs().max().item() for r, o in zip(results, outs))
    assert err < 1e-5  # the garbage pages never reached attention, later steps reloaded cleanly
    engine.close()


def test_config_errors_through_the_engine():
    with pytest.raises(ValueError, match="retrieval_chunk"):
        make_engine(retrieval_chunk=3)
    with pytest.raises(ValueError, match="keep_ratio"):
        make_engine(keep_ratio=2.0)
    with pytest.raises(ValueError, match=r"sink_frames=6 disagrees with the engine's --sink-frames 3"):
        make_engine(sink_frames=6)
    with pytest.raises(ValueError, match="raise bank_bytes"):
        make_engine(bank_bytes=1000)
