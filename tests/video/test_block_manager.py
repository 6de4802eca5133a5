"""Block manager: free list, reference counts, per-session block tables, partial last pages."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldkv_connector.integration.video.block_manager import BlockManager, ChunkBlocks, KVCacheOutOfPages


def test_chunk_pages_and_partial_last_page():
    bm = BlockManager(num_pages=10, page_size=16)
    bm.add_session("a")
    blocks = bm.append_chunk("a", 0, num_tokens=40)  # 16 + 16 + 8
    assert len(blocks.page_ids) == 3
    assert blocks.page_lens(16) == [16, 16, 8]
    assert bm.num_used == 3 and bm.num_free == 7
    assert all(bm.ref_count(p) == 1 for p in blocks.page_ids)
    assert ChunkBlocks((5,), 16).page_lens(16) == [16]
    bm.remove_chunk("a", 0)
    assert bm.num_used == 0 and bm.peak_used == 3
    bm.check_invariants()


def test_out_of_pages_names_the_flag_and_changes_nothing():
    bm = BlockManager(num_pages=4, page_size=16)
    bm.add_session("a")
    bm.append_chunk("a", 0, 48)
    with pytest.raises(KVCacheOutOfPages, match="--kv-cache-memory") as err:
        bm.append_chunk("a", 1, 48)
    assert isinstance(err.value, ValueError)  # a configuration error: the CLI prints it without traceback
    assert bm.num_free == 1 and 1 not in bm.table("a")
    bm.check_invariants()


def test_shared_page_is_freed_by_its_last_holder():
    bm = BlockManager(num_pages=8, page_size=4)
    bm.add_session("a")
    bm.add_session("b")
    blocks = bm.append_chunk("a", 0, 8)
    bm.attach_chunk("b", 7, list(blocks.page_ids), 8)  # b reads a's chunk: one more reference
    assert [bm.ref_count(p) for p in blocks.page_ids] == [2, 2]
    bm.end_session("a")
    assert bm.num_used == 2  # still in b's table
    bm.check_invariants()
    assert bm.end_session("b") == list(blocks.page_ids)
    assert bm.num_used == 0
    bm.check_invariants()


def test_transfer_keeps_pages_until_the_new_owner_releases():
    bm = BlockManager(num_pages=8, page_size=4)
    bm.add_session("a")
    blocks = bm.append_chunk("a", 3, 6)
    bm.remove_chunk("a", 3, to_owner="evicted")  # handed over, e.g. to a connector's write-through
    assert bm.num_used == 2 and bm.hold_count("evicted", blocks.page_ids[0]) == 1
    bm.check_invariants()
    assert sorted(bm.release(list(blocks.page_ids), "evicted")) == sorted(blocks.page_ids)
    assert bm.num_used == 0


def test_bad_requests_raise():
    bm = BlockManager(num_pages=4, page_size=4)
    bm.add_session("a")
    with pytest.raises(ValueError, match="already has a block table"):
        bm.add_session("a")
    with pytest.raises(ValueError, match="unknown session"):
        bm.append_chunk("zz", 0, 4)
    bm.append_chunk("a", 0, 4)
    with pytest.raises(ValueError, match="already has chunk 0"):
        bm.append_chunk("a", 0, 4)
    with pytest.raises(ValueError, match="holds it 0 time"):
        bm.release([0], "someone-else")
    with pytest.raises(ValueError, match="not an allocated page"):
        bm.share([3], "x")
    with pytest.raises(ValueError, match="need 2 page"):
        bm.attach_chunk("a", 1, [0], 8)
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(0, 4)
    bm.check_invariants()


# --- property test: random allocate / share / move / free sequences ------------------------------
SESSIONS = ["s0", "s1", "s2"]
op = st.one_of(
    st.tuples(st.just("append"), st.sampled_from(SESSIONS), st.integers(1, 40)),
    st.tuples(st.just("attach"), st.sampled_from(SESSIONS), st.integers(0, 1000)),
    st.tuples(st.just("remove"), st.sampled_from(SESSIONS), st.integers(0, 1000)),
    st.tuples(st.just("evict"), st.sampled_from(SESSIONS), st.integers(0, 1000)),
    st.tuples(st.just("free_evicted"), st.sampled_from(SESSIONS), st.integers(0, 1000)),
    st.tuples(st.just("pool"), st.sampled_from(SESSIONS), st.integers(0, 5)),
    st.tuples(st.just("end"), st.sampled_from(SESSIONS), st.integers(0, 1)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=60), st.integers(4, 24), st.integers(1, 8))
def test_invariants_hold_under_random_sequences(ops, num_pages, page_size):
    bm = BlockManager(num_pages, page_size)
    next_id = 0
    for kind, sid, n in ops:
        if not bm.has_session(sid):
            bm.add_session(sid)
        table = bm.table(sid)
        if kind == "append":
            if bm.can_allocate(bm.pages_for(n)):
                bm.append_chunk(sid, next_id, n)
            else:
                with pytest.raises(KVCacheOutOfPages):
                    bm.append_chunk(sid, next_id, n)
            next_id += 1
        elif kind == "attach":  # another session's chunk enters this session's window
            others = [(o, c, b) for o in SESSIONS if o != sid and bm.has_session(o) for c, b in bm.table(o).items()]
            if others:
                _, _, blocks = others[n % len(others)]
                bm.attach_chunk(sid, next_id, list(blocks.page_ids), blocks.num_tokens)
                next_id += 1
        elif kind in ("remove", "evict") and table:
            chunk = list(table)[n % len(table)]
            bm.remove_chunk(sid, chunk, to_owner="evicted" if kind == "evict" else None)
        elif kind == "free_evicted":
            held = sorted(bm.holds("evicted").elements())
            if held:
                bm.release(held[: 1 + n % len(held)], "evicted")
        elif kind == "pool":  # pages held outside any table (a connector's hot set)
            if bm.can_allocate(n):
                bm.allocate(n, "hot")
        elif kind == "end":
            bm.end_session(sid, to_owner="evicted" if n else None)
        bm.check_invariants()
        # a page listed in several tables carries one reference per listing (plus pool holds)
        listings = {}
        for o in SESSIONS:
            if bm.has_session(o):
                for b in bm.table(o).values():
                    for p in b.page_ids:
                        listings[p] = listings.get(p, 0) + 1
        for p, count in listings.items():
            assert bm.ref_count(p) >= count
    for sid in SESSIONS:
        if bm.has_session(sid):
            bm.end_session(sid)
    bm.release_all("evicted")
    bm.release_all("hot")
    bm.check_invariants()
    assert bm.num_free == num_pages and bm.num_used == 0


def test_contiguous_allocation_takes_the_lowest_free_run_else_any_pages():
    bm = BlockManager(num_pages=12, page_size=4)
    a = bm.allocate(3, "a")
    b = bm.allocate(2, "b")
    bm.allocate(7, "c")
    bm.release(a, "a")  # free: 0 1 2
    bm.release(b[:1], "b")  # free: 0 1 2 3
    bm.release_all("c")  # free: 0 1 2 3 5..11 ; page 4 still held by b
    assert bm.allocate(5, "x", contiguous=True) == [5, 6, 7, 8, 9]
    assert bm.allocate(4, "y", contiguous=True) == [0, 1, 2, 3]
    got = bm.allocate(2, "z", contiguous=True)  # 10, 11 left
    assert sorted(got) == [10, 11]
    bm.release_all("x")
    bm.release_all("y")
    bm.release(b[1:], "b")
    bm.allocate(1, "hole")  # split the free list so no run of 12 - 3 - 1 exists
    taken = bm.allocate(bm.num_free, "rest", contiguous=True)  # no run long enough: any pages
    assert len(taken) == len(set(taken)) and bm.num_free == 0
    bm.check_invariants()


def _lowest_run_by_sorting(free: list[int], n: int):
    """The original numpy _take_run: sort the free list, first window spanning n - 1."""
    import numpy as np

    pool = np.array(free, dtype=np.int64)
    ids = np.sort(pool)
    fits = np.flatnonzero(ids[n - 1:] - ids[: ids.size - n + 1] == n - 1)
    if not fits.size:
        return None, free
    lo = int(ids[fits[0]])
    return list(range(lo, lo + n)), pool[(pool < lo) | (pool >= lo + n)].tolist()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9), st.integers(0, 3)), max_size=50), st.integers(8, 40))
def test_contiguous_runs_and_free_order_match_the_sorting_search(ops, num_pages):
    """Same pages and same free-list order (which decides later non-contiguous pops) as the sort."""
    bm = BlockManager(num_pages=num_pages, page_size=4)
    held = {o: [] for o in range(4)}
    for take, n, owner in ops:
        if take and n <= bm.num_free:
            before = list(bm._free)
            want, rest = _lowest_run_by_sorting(before, n) if n > 1 else (None, None)
            got = bm.allocate(n, str(owner), contiguous=True)
            if want is not None:
                assert got == want and bm._free == rest
            held[owner] += got
        elif held[owner]:
            k = min(n, len(held[owner]))
            bm.release(held[owner][-k:], str(owner))  # release in an order that scatters the free list
            del held[owner][-k:]
        bm.check_invariants()


def test_contiguous_run_with_reference_counts_above_255():
    bm = BlockManager(num_pages=8, page_size=4)
    pages = bm.allocate(2, "a")
    for i in range(300):
        bm.share(pages, f"s{i}")
    assert bm.allocate(3, "b", contiguous=True) == [2, 3, 4]
    bm.check_invariants()
