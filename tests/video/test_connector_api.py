"""The engine side of the engine <-> connector contract, driven by a small in-test connector that
keeps exact CPU copies of committed chunks and puts chosen chunks back into the window."""
import json

import pytest
import torch

from worldkv_connector.integration.video import VideoEngine
from worldkv_connector.integration.video.attention import PagedAttention
from worldkv_connector.connector.api import (
    ExternalChunk, VideoKVConnector, get_connector_class, register_connector,
)
from worldkv_connector.integration.video.scheduler import EVICTED_OWNER

PS = 16  # page size: a tiny chunk (48 tokens) is 3 pages, a 40-token stored chunk leaves a partial page


@register_connector("copy-test")
class CopyConnector(VideoKVConnector):
    """Config JSON: put_back (chunk ids), keep_tokens (tokens stored per chunk, a stand-in for
    compression), fail_chunks (loads that fail), hold_evicted (never free evicted pages until unset),
    wait_finish (ask the engine to wait for stores when a session ends)."""

    def __init__(self, engine_config, kv_shape, connector_config_json, device):
        super().__init__(engine_config, kv_shape, connector_config_json, device)
        cfg = json.loads(connector_config_json or "{}")
        self.put_back = cfg.get("put_back", [])
        self.keep_tokens = cfg.get("keep_tokens", engine_config.chunk_tokens)
        self.fail_chunks = set(cfg.get("fail_chunks", []))
        self.hold_evicted = cfg.get("hold_evicted", False)
        self.wait_finish = cfg.get("wait_finish", False)
        self.bank = {}  # (session, chunk) -> layer -> (k, v) [chunk_tokens, H, D], exact copies
        self.hot = {}  # session -> pages loaded in its last step (given back at its next step)
        self.to_free, self.evicted, self.pending_loads = [], [], []
        self.errors, self.finished, self.events, self.finished_calls = set(), set(), [], []

    def _slots(self, pages, n):
        return [p * PS + o for p in pages for o in range(PS)][:n]

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        ec, c = self.engine_config, request.chunk_index
        window = set(range(min(c, ec.sink_chunks))) | set(range(max(ec.sink_chunks, c - ec.recent_chunks), c))
        self.events.append(("match", request.session_id, c, num_computed_tokens))
        request.release_pages = self.hot.pop(request.session_id, [])
        for cid in self.put_back:
            if (request.session_id, cid) in self.bank and cid not in window:
                request.external.append(ExternalChunk(cid, self.keep_tokens, [], True))
        return sum(e.num_tokens for e in request.external), False

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        loads = [e for e in request.external if e.needs_load]
        assert len(loads) == len(block_ids)
        for ext, pages in zip(loads, block_ids):
            assert ext.page_ids == pages and len(pages) == -(-ext.num_tokens // PS)
            self.pending_loads.append((request.session_id, ext.chunk_id, pages, ext.num_tokens))
        self.hot[request.session_id] = [p for b in block_ids for p in b]

    def build_connector_meta(self, scheduler_output):
        self.evicted += [p for ch in scheduler_output.evicted for p in ch.page_ids]
        meta = {"loads": self.pending_loads, "stores": scheduler_output.committed}
        self.pending_loads = []
        return meta

    def request_finished(self, session_id, block_ids):
        self.finished_calls.append((session_id, list(block_ids)))
        self.to_free += self.hot.pop(session_id, [])
        if self.wait_finish:
            self.finished.add(session_id)
        return self.wait_finish, None

    def take_pages_to_free(self):
        out, self.to_free = self.to_free, []
        if not self.hold_evicted:
            out, self.evicted = out + self.evicted, []
        return out

    # worker side
    def register_kv_caches(self, kv_caches):
        self.kv = kv_caches

    def start_load_kv(self, forward_context):
        self.events.append(("start_load", forward_context.step))
        self.errors = set()
        self.layers_pending = {name: list(self._metadata["loads"]) for name in self.kv}
        for _, _, pages, _ in self._metadata["loads"]:
            for kv in self.kv.values():  # not landed yet: anyone reading before the wait sees NaN
                kv[:, pages] = float("nan")

    def wait_for_layer_load(self, layer_name):
        for sid, cid, pages, n in self.layers_pending.pop(layer_name, []):
            if cid in self.fail_chunks:
                self.errors.update(pages)
                continue
            k, v = self.bank[(sid, cid)][layer_name]
            flat = self.kv[layer_name].view(2, -1, *k.shape[1:])
            slots = torch.tensor(self._slots(pages, n))
            flat[0, slots], flat[1, slots] = k[:n], v[:n]

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata):
        assert attn_metadata.is_clean_pass
        flat = kv_layer.view(2, -1, *kv_layer.shape[-2:])
        for ch in attn_metadata.committed:
            slots = torch.tensor(self._slots(ch.page_ids, ch.num_tokens))
            self.bank.setdefault((ch.session_id, ch.chunk_id), {})[layer_name] = (
                flat[0, slots].clone(), flat[1, slots].clone())

    def get_finished(self, finished_req_ids):
        done = {s for s in finished_req_ids if s in self.finished}
        return done, None

    def get_block_ids_with_load_errors(self):
        return set(self.errors)

    def metrics(self):
        return {"bank_bytes": sum(k.numel() * 8 for d in self.bank.values() for k, _ in d.values())}


class RecordingAttention(PagedAttention):
    """Keeps every layer call of the step (inputs, output, the window as read) for the checks."""

    calls: list

    def __call__(self, layer_idx, q, k, v):
        out = super().__call__(layer_idx, q, k, v)
        rows = [[(s.kind, s.chunk_id, s.num_tokens) for s in row] for row in self.plan.rows]
        self.calls.append((layer_idx, list(self.plan.session_ids), rows, q.clone(), k.clone(), v.clone(), out.clone()))
        return out


def make_engine(config, **kwargs):
    engine = VideoEngine(model="tiny", attention_window="sliding", sink_frames=3, recent_frames=6,
                         page_size=PS, kv_cache_memory=0.01, num_denoising_steps=2,
                         kv_connector="copy-test", kv_connector_config=json.dumps(config), **kwargs)
    rec = RecordingAttention(engine.runner.kv_caches, "torch", engine.connector)
    rec.calls = []
    engine.runner.attention = rec
    return engine, rec


def dense(q, k, v):
    s = torch.einsum("thd,nhd->htn", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.einsum("htn,nhd->thd", torch.softmax(s, -1), v.double()).float()


def check_step(conn, rec):
    """Every layer call of the step equals dense attention over sink|external|recent|current built
    from the connector's exact copies; returns the windows read."""
    windows = []
    for layer, sids, rows, q, k, v, out in rec.calls:
        assert torch.isfinite(out).all()
        for r, (sid, row) in enumerate(zip(sids, rows)):
            kinds = [kind for kind, _, _ in row]
            assert kinds == sorted(kinds, key=["sink", "external", "recent", "current"].index)
            ks, vs = [], []
            for kind, cid, n in row[:-1]:
                ck, cv = conn.bank[(sid, cid)][f"blocks.{layer}"]
                ks.append(ck[:n])
                vs.append(cv[:n])
            ref = dense(q[r], torch.cat(ks + [k[r]]), torch.cat(vs + [v[r]]))
            assert (out[r] - ref).abs().max().item() < 1e-5
            windows.append((sid, [(kind, cid) for kind, cid, _ in row]))
    rec.calls.clear()
    return windows


def test_external_chunks_sit_between_sink_and_recent_and_match_dense():
    engine, rec = make_engine({"put_back": [1, 2], "keep_tokens": 40})
    conn = engine.connector
    engine.add_session("a", trajectory="R_L90", num_chunks=6, seed=1)
    engine.add_session("b", trajectory="L90", num_chunks=6, seed=2)
    seen = {}
    for step in range(6):
        results = engine.step()
        for sid, window in check_step(conn, rec):
            seen[(sid, step)] = window
        for r in results:
            assert r.retrieved == [c for c in (1, 2) if step - 2 > c]  # left the recent window
    # chunk 5: sink 0 | external 1, 2 (40 tokens: 2 full pages + one of 8) | recent 3, 4 | current 5
    assert seen[("a", 5)] == [("sink", 0), ("external", 1), ("external", 2), ("recent", 3), ("recent", 4),
                              ("current", 5)]
    assert seen[("b", 3)] == [("sink", 0), ("recent", 1), ("recent", 2), ("current", 3)]
    assert ("start_load", 0) in conn.events
    # the connector saw the window it completes: sink + recent tokens already there
    assert ("match", "a", 5, 3 * 48) in conn.events
    engine.drain()
    assert engine.block_manager.num_used == 0
    engine.block_manager.check_invariants()
    assert engine.metrics()["connector"]["bank_bytes"] > 0
    engine.close()


def test_failed_load_drops_the_chunk_from_the_window():
    engine, rec = make_engine({"put_back": [1, 2], "fail_chunks": [1]})
    conn = engine.connector
    engine.add_session("a", trajectory="R_L90", num_chunks=6, seed=1)
    results = []
    while engine.has_unfinished_sessions():
        results += engine.step()
        for _, window in check_step(conn, rec):  # finite, and equal to the window without chunk 1
            assert ("external", 1) not in window
    assert results[4].retrieved == [] and results[5].retrieved == [2]  # chunk 1 dropped, 2 still recent at 4
    engine.close()


def test_evicted_pages_are_freed_only_when_the_connector_returns_them():
    engine, _ = make_engine({"hold_evicted": True})
    conn, bm = engine.connector, engine.block_manager
    engine.add_session("a", trajectory="R90", num_chunks=6, seed=1)
    for _ in range(3):
        engine.step()
    assert conn.evicted == []
    engine.step()  # chunk 3 commits: chunk 1 leaves the recent window (announced in this step's output)
    assert sorted(bm.table("a")) == [0, 2, 3]
    assert len(conn.evicted) == 3  # chunk 1's three pages, handed over
    assert all(bm.ref_count(p) == 1 and bm.hold_count(EVICTED_OWNER, p) == 1 for p in conn.evicted)
    engine.run()
    # evicted chunks 1, 2, 3 wait for the connector; the finished session's own pages are free
    assert bm.num_used == 3 * 3
    conn.hold_evicted = False
    engine.drain()
    assert bm.num_used == 0
    bm.check_invariants()
    engine.close()


def test_finished_session_waits_for_the_connector_when_asked():
    engine, _ = make_engine({"wait_finish": True, "put_back": [0]})
    engine.add_session("a", num_chunks=4, seed=1)
    engine.step()
    engine.run()  # run() drains: get_finished reports "a", its pages are released
    (sid, pages), = engine.connector.finished_calls
    assert sid == "a" and len(pages) == 3 * 3  # sink chunk 0 + recent chunks 2, 3
    assert engine.block_manager.num_used == 0 and not engine.scheduler.has_pending()
    engine.close()


def test_registry_and_module_paths():
    assert get_connector_class("copy-test") is CopyConnector
    base = "worldkv_connector.connector.api:VideoKVConnector"
    assert get_connector_class(base) is VideoKVConnector
    with pytest.raises(ValueError, match="unknown --kv-connector 'nope'"):
        get_connector_class("nope")
    with pytest.raises(ValueError, match="cannot import module"):
        get_connector_class("no_such_module_xyz:Thing")
    with pytest.raises(ValueError, match="not a VideoKVConnector subclass"):
        get_connector_class("json:JSONDecoder")
    with pytest.raises(TypeError, match="not a VideoKVConnector subclass"):
        register_connector("bad")(dict)
    try:
        cls = get_connector_class("worldkv")  # imported lazily from worldkv_connector.connector
    except ValueError as exc:
        assert "worldkv_connector.connector" in str(exc)
    else:
        assert issubclass(cls, VideoKVConnector)


def test_do_nothing_connector_changes_nothing():
    common = dict(model="tiny", attention_window="sliding", kv_cache_memory=0.01, num_denoising_steps=1)
    with VideoEngine(**common) as plain, VideoEngine(
        kv_connector="worldkv_connector.connector.api:VideoKVConnector", **common
    ) as hooked:
        for e in (plain, hooked):
            e.add_session("a", trajectory="R90", num_chunks=5, seed=3)
        a, b = plain.run()["a"], hooked.run()["a"]
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        # evicted pages wait for take_pages_to_free, which the base class never returns
        assert hooked.block_manager.num_used == 2 and plain.block_manager.num_used == 0  # chunks 1, 2
