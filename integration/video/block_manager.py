"""Pure-Python page allocator of the paged KV cache: a free list, reference counts, one block table
per session and a valid-token count per page (a chunk's last page may be partial).

Every reference to a page is a *hold* by a named owner (a session id, or an engine-internal pool
such as the connector's hot set). ``ref_count(p)`` always equals the number of holds on ``p``; a
page returns to the free list when its last hold is released. A session's block table maps chunk
ids to the pages its session holds for them. One page id addresses the same slot in every layer's
pool (as in vLLM), so tables are per session, not per layer.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

from worldkv_connector.checks import check_int, is_int

__all__ = ["BlockManager", "ChunkBlocks", "KVCacheOutOfPages", "CONNECTOR_OWNER", "EVICTED_OWNER"]

# Owners of pages a KV connector decides about (the video scheduler and the SGLang plugin use both)
CONNECTOR_OWNER = "__connector__"  # pages allocated for needs_load external chunks (connector's hot set)
EVICTED_OWNER = "__evicted__"  # pages of chunks that left the recent window, until take_pages_to_free


class KVCacheOutOfPages(ValueError):
    """The KV cache has too few pages for the requested work. A configuration error: the user must
    give the cache more memory (``--kv-cache-memory``) or ask for less (fewer sessions, a window)."""


@dataclass(frozen=True)
class ChunkBlocks:
    """The pages of one chunk: ``page_ids`` in token order, ``num_tokens`` valid tokens in all."""

    page_ids: tuple[int, ...]
    num_tokens: int

    def page_lens(self, page_size: int) -> list[int]:
        """Valid tokens of each page: full pages, then a possibly partial last page."""
        lens = [page_size] * len(self.page_ids)
        if lens:
            lens[-1] = self.num_tokens - page_size * (len(self.page_ids) - 1)
        return lens


class BlockManager:
    """Free list + reference counts over ``num_pages`` pages of ``page_size`` tokens."""

    def __init__(self, num_pages: int, page_size: int, memory_flag: str = "--kv-cache-memory"):
        self.num_pages = check_int("num_pages", num_pages, lo=1)
        self.page_size = check_int("page_size", page_size, lo=1)
        self._memory_flag = memory_flag
        # pop() from the end: low page ids are handed out first, which keeps tests readable
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._ref = [0] * num_pages
        self._holds: dict[str, collections.Counter] = {}
        self._tables: dict[str, dict[int, ChunkBlocks]] = {}
        self.peak_used = 0

    # --- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def holds(self, owner: str) -> collections.Counter:
        """page -> number of holds of ``owner`` (a copy)."""
        return collections.Counter(self._holds.get(owner, {}))

    def hold_count(self, owner: str, page: int) -> int:
        held = self._holds.get(owner)
        return held[page] if held else 0

    def owners(self) -> list[str]:
        return [o for o, c in self._holds.items() if c]

    # --- holds ------------------------------------------------------------------------------------
    def allocate(self, num_pages: int, owner: str, *, contiguous: bool = False) -> list[int]:
        """Take ``num_pages`` free pages, each held once by ``owner``. Raises KVCacheOutOfPages.

        contiguous: prefer consecutive page ids (the lowest free run long enough), so a loaded
        chunk's pages are one run per layer and K/V and its copy merges into few descriptors;
        falls back to any free pages when the free list has no such run."""
        if num_pages < 0:
            raise ValueError(f"num_pages={num_pages}: expected >= 0")
        if num_pages > len(self._free):
            raise KVCacheOutOfPages(
                f"KV cache out of pages: need {num_pages} more page(s) of {self.page_size} tokens, "
                f"{len(self._free)} of {self.num_pages} free; raise {self._memory_flag} "
                "(or use fewer sessions / a sliding attention window)"
            )
        pages = self._take_run(num_pages) if contiguous and num_pages > 1 else None
        if pages is None:
            pages = [self._free.pop() for _ in range(num_pages)]
        held = self._holds.setdefault(owner, collections.Counter())
        ref, get = self._ref, held.get
        for p in pages:
            ref[p] = 1
            held[p] = get(p, 0) + 1
        self.peak_used = max(self.peak_used, self.num_used)
        return pages

    def _take_run(self, num_pages: int) -> list[int] | None:
        """Remove and return the lowest run of ``num_pages`` consecutive free ids, or None.

        A page is free exactly when its reference count is 0 (check_invariants), so the lowest run is
        the first run of ``num_pages`` zero bytes in the counts (a C-level search, no sort of the free
        list). The rest of the free list keeps its order."""
        try:
            counts = bytes(self._ref)
        except ValueError:  # a count above 255: only zero / non-zero matters
            counts = bytes(map(bool, self._ref))
        lo = counts.find(bytes(num_pages))
        if lo < 0:
            return None
        hi = lo + num_pages
        run = list(range(lo, hi))
        free = self._free
        # common case: the run sits in the free list as one slice (ascending or descending), usually
        # near its end (pages freed last, or the low ids of the initial list): delete that slice
        i = len(free) - 1 - free[::-1].index(lo)
        if free[i:i + num_pages] == run:
            del free[i:i + num_pages]
        elif i + 1 >= num_pages and free[i + 1 - num_pages:i + 1] == run[::-1]:
            del free[i + 1 - num_pages:i + 1]
        else:
            self._free = [p for p in free if p < lo or p >= hi]  # the rest, in their order
        return run

    def share(self, pages: list[int], owner: str) -> None:
        """Add one hold of ``owner`` on each allocated page (the page is now referenced twice)."""
        for p in pages:
            self._check_allocated(p)
        held = self._holds.setdefault(owner, collections.Counter())
        for p in pages:
            self._ref[p] += 1
            held[p] += 1

    def release_connector_pages(self, pages) -> list[int]:
        """Drop one hold on each page a connector gave back (``release_pages``, ``take_pages_to_free``)
        from whichever of ``EVICTED_OWNER`` / ``CONNECTOR_OWNER`` holds it. Returns the pages that
        neither held (the caller logs them; nothing is released for those)."""
        unknown = []
        for p in pages:
            for owner in (EVICTED_OWNER, CONNECTOR_OWNER):
                if self.hold_count(owner, p):
                    self.release([p], owner)
                    break
            else:
                unknown.append(p)
        return unknown

    def release(self, pages: list[int], owner: str) -> list[int]:
        """Drop one hold of ``owner`` on each page; returns the pages that became free."""
        held = self._holds.get(owner, collections.Counter())
        need = collections.Counter(pages)
        for p, n in need.items():
            if held[p] < n:
                raise ValueError(f"page {p}: owner {owner!r} holds it {held[p]} time(s), asked to release {n}")
        freed = []
        ref = self._ref
        for p in pages:
            left = held[p] - 1
            if left:
                held[p] = left
            else:
                held.pop(p)  # dict.pop: Counter's own __delitem__ is Python code
            ref[p] -= 1
            if ref[p] == 0:
                self._free.append(p)
                freed.append(p)
        return freed

    def transfer(self, pages: list[int], src: str, dst: str) -> None:
        """Move one hold per page from ``src`` to ``dst`` (reference counts unchanged)."""
        held = self._holds.get(src, collections.Counter())
        need = collections.Counter(pages)
        for p, n in need.items():
            if held[p] < n:
                raise ValueError(f"page {p}: owner {src!r} holds it {held[p]} time(s), asked to move {n}")
        dst_held = self._holds.setdefault(dst, collections.Counter())
        for p in pages:
            held[p] -= 1
            if not held[p]:
                del held[p]
            dst_held[p] += 1

    def _check_allocated(self, page: int) -> None:
        if not (is_int(page) and 0 <= page < self.num_pages) or self._ref[page] == 0:
            raise ValueError(f"page {page!r} is not an allocated page of this cache (0..{self.num_pages - 1})")

    # --- block tables (one per session) -------------------------------------------------------------
    def add_session(self, session_id: str) -> None:
        if session_id in self._tables:
            raise ValueError(f"session {session_id!r} already has a block table")
        self._tables[session_id] = {}

    def has_session(self, session_id: str) -> bool:
        return session_id in self._tables

    def table(self, session_id: str) -> dict[int, ChunkBlocks]:
        """chunk id -> ChunkBlocks of the session, in insertion order (a copy)."""
        return dict(self._session(session_id))

    def append_chunk(self, session_id: str, chunk_id: int, num_tokens: int) -> ChunkBlocks:
        """Allocate pages for ``num_tokens`` tokens of a new chunk in the session's table."""
        table = self._session(session_id)
        if chunk_id in table:
            raise ValueError(f"session {session_id!r} already has chunk {chunk_id}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens}: expected >= 1")
        pages = self.allocate(self.pages_for(num_tokens), owner=session_id)
        table[chunk_id] = blocks = ChunkBlocks(tuple(pages), num_tokens)
        return blocks

    def attach_chunk(self, session_id: str, chunk_id: int, page_ids: list[int], num_tokens: int) -> ChunkBlocks:
        """Put already-allocated pages into the session's table (one more hold on each)."""
        table = self._session(session_id)
        if chunk_id in table:
            raise ValueError(f"session {session_id!r} already has chunk {chunk_id}")
        if len(page_ids) != self.pages_for(num_tokens) or num_tokens < 1:
            raise ValueError(f"{num_tokens} tokens need {self.pages_for(num_tokens)} page(s), got {len(page_ids)}")
        self.share(list(page_ids), owner=session_id)
        table[chunk_id] = blocks = ChunkBlocks(tuple(page_ids), num_tokens)
        return blocks

    def remove_chunk(self, session_id: str, chunk_id: int, to_owner: str | None = None) -> ChunkBlocks:
        """Take a chunk out of the session's table. Its holds are released (pages whose count drops
        to 0 are free) or, with ``to_owner``, moved to that owner (the pages stay allocated)."""
        table = self._session(session_id)
        try:
            blocks = table.pop(chunk_id)
        except KeyError:
            raise ValueError(f"session {session_id!r} has no chunk {chunk_id}") from None
        if to_owner is None:
            self.release(list(blocks.page_ids), session_id)
        else:
            self.transfer(list(blocks.page_ids), session_id, to_owner)
        return blocks

    def end_session(self, session_id: str, to_owner: str | None = None) -> list[int]:
        """Remove the session's table; release its holds (or move them to ``to_owner``).
        Returns the pages it held."""
        table = self._session(session_id)
        pages: list[int] = []
        for chunk_id in list(table):
            pages.extend(self.remove_chunk(session_id, chunk_id, to_owner).page_ids)
        extra = list(self._holds.get(session_id, collections.Counter()).elements())
        if extra:  # holds taken with allocate(owner=session) outside the table
            if to_owner is None:
                self.release(extra, session_id)
            else:
                self.transfer(extra, session_id, to_owner)
            pages.extend(extra)
        self._holds.pop(session_id, None)
        del self._tables[session_id]
        return pages

    def release_all(self, owner: str) -> list[int]:
        """Drop every hold of ``owner``; returns the pages that became free."""
        held = self._holds.get(owner)
        return self.release(list(held.elements()), owner) if held else []

    def _session(self, session_id: str) -> dict[int, ChunkBlocks]:
        try:
            return self._tables[session_id]
        except KeyError:
            raise ValueError(f"unknown session {session_id!r}") from None

    # --- invariants (used by the property tests; cheap enough for debug runs) ------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the free list, reference counts, holds and tables disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is twice in the free list"
        total = collections.Counter()
        for held in self._holds.values():
            assert all(n > 0 for n in held.values()), "a hold count is not positive"
            total.update(held)
        for p in range(self.num_pages):
            assert self._ref[p] == total[p], f"page {p}: ref count {self._ref[p]} != holds {total[p]}"
            assert (self._ref[p] == 0) == (p in free), f"page {p}: ref count {self._ref[p]}, in free list {p in free}"
        for sid, table in self._tables.items():
            in_table = collections.Counter(p for b in table.values() for p in b.page_ids)
            held = self._holds.get(sid, collections.Counter())
            for p, n in in_table.items():
                assert held[p] >= n, f"session {sid!r}: page {p} is in its table {n} time(s) but held {held[p]}"
            for b in table.values():
                assert len(b.page_ids) == self.pages_for(b.num_tokens), f"session {sid!r}: pages/tokens mismatch"
