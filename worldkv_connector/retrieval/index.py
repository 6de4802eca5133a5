"""PoseIndex: banked chunks labelled by camera pose, queried for the k best to reinsert.

Each session keeps its chunk poses in contiguous numpy arrays (capacity doubles, removal swaps
the last row into the hole), so a query is a few vectorised passes plus ``np.argpartition``:
no Python loop over candidates. Sessions never see each other's chunks.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from worldkv_connector.checks import check_int
from worldkv_connector.retrieval.policy import POLICIES, get_policy, orthonormalize
from worldkv_connector.retrieval.poses import chunk_mean_pose, validate_poses

__all__ = ["PoseIndex"]

_MIN_CAPACITY = 16
EXACT_SELECT = 64  # top-k of at most this many scored candidates: a plain sort by (score, chunk id)


class _Session:
    """Per-session candidate arrays; columns ``[0, n)`` are live, ``row_of`` maps chunk id -> row.

    Struct-of-arrays: ``t`` is ``[3, cap]`` and ``R`` / ``R_ortho`` are ``[9, cap]``, so every
    component the scorer streams over is contiguous and a score pass needs no BLAS call (a
    threaded BLAS on a busy 2-core host costs milliseconds for a 100k mat-vec). ``prep`` holds
    the policy's per-chunk data (``policy.prepare``, e.g. the fov policy's face planes), computed
    once at insert and moved with its row. ``R_ortho`` (an SVD per insert) is kept only for a
    policy that reads proper rotations (``orthonormal``) or prepares per-chunk data from them.
    """

    __slots__ = ("n", "ids", "t", "R", "R_ortho", "row_of", "prep", "prepare")

    def __init__(self, prepare=None, orthonormal: bool = True) -> None:
        self.n = 0
        self.ids = np.empty(_MIN_CAPACITY, dtype=np.int64)  # [cap]
        self.t = np.empty((3, _MIN_CAPACITY))  # [3, cap] mean translation
        self.R = np.empty((9, _MIN_CAPACITY))  # [9, cap] element-wise mean rotation, row-major 3x3
        # [9, cap] its nearest proper rotation, or None when the policy never reads it
        self.R_ortho = np.empty((9, _MIN_CAPACITY)) if orthonormal or prepare is not None else None
        self.row_of: dict[int, int] = {}
        # the policy's per-chunk data (``policy.prepare``), ``[..., cap]``; made on first append
        self.prepare = prepare
        self.prep: np.ndarray | None = None

    def reserve(self, need: int) -> None:
        cap = self.ids.shape[0]
        if need <= cap:
            return
        while cap < need:
            cap *= 2  # amortised O(1) appends
        for name in ("ids", "t", "R", "R_ortho", "prep"):
            old = getattr(self, name)
            if old is None:
                continue
            new = np.empty(old.shape[:-1] + (cap,), dtype=old.dtype)
            new[..., : self.n] = old[..., : self.n]
            setattr(self, name, new)

    def cand_t(self) -> np.ndarray:
        """[n, 3] float64 view of the live mean translations."""
        return self.t[:, : self.n].T

    def cand_R(self, orthonormal: bool) -> np.ndarray:
        """[n, 3, 3] float64 view of the live mean (or orthonormalised mean) rotations."""
        store = self.R_ortho if orthonormal else self.R
        return store[:, : self.n].T.reshape(self.n, 3, 3)

    def append(self, ids: np.ndarray, t: np.ndarray, R: np.ndarray) -> None:
        """ids: [k] int64, t: [k, 3], R: [k, 3, 3] mean rotations."""
        k = ids.shape[0]
        self.reserve(self.n + k)
        sl = slice(self.n, self.n + k)
        self.ids[sl] = ids
        self.t[:, sl] = t.T
        self.R[:, sl] = R.reshape(k, 9).T
        if self.R_ortho is not None:
            ortho = orthonormalize(R)
            self.R_ortho[:, sl] = ortho.reshape(k, 9).T
        if self.prepare is not None:
            data = self.prepare(t, ortho)
            if self.prep is None:
                self.prep = np.empty(data.shape[:-1] + (self.ids.shape[0],), dtype=data.dtype)
            self.prep[..., sl] = data
        for j, cid in enumerate(ids.tolist()):
            self.row_of[cid] = self.n + j
        self.n += k

    def remove(self, chunk_id: int) -> bool:
        row = self.row_of.pop(chunk_id, None)
        if row is None:
            return False
        last = self.n - 1
        if row != last:  # swap-remove: the last column fills the hole
            for arr in (self.ids, self.t, self.R, self.R_ortho, self.prep):
                if arr is not None:
                    arr[..., row] = arr[..., last]
            self.row_of[int(self.ids[row])] = row
        self.n = last
        return True


def _check_chunk_id(chunk_id) -> int:
    return check_int("chunk_id", chunk_id, 0)


def _check_session(session_id) -> str:
    if not isinstance(session_id, str):
        raise ValueError(f"session_id={session_id!r}: expected a str")
    return session_id


class PoseIndex:
    """Chunk poses per session with top-k retrieval by a registered scoring policy.

    policy: a name in ``worldkv_connector.retrieval.POLICIES`` (``"pose"``: the WorldKV distance,
    ``"fov"``: frustum overlap), built with ``policy_kwargs``; or a policy instance, used as is.
    Poses are camera-to-world ``[F, 4, 4]`` float (OpenCV axes); a chunk is labelled with the
    mean of its frames' poses (``chunk_mean_pose``).
    """

    def __init__(self, policy: str | object = "pose", **policy_kwargs) -> None:
        if isinstance(policy, str):
            self.policy_name = policy
            self.policy = get_policy(policy, **policy_kwargs)
        else:
            if policy_kwargs:
                raise ValueError(f"policy_kwargs {sorted(policy_kwargs)} are for a policy name, not an instance")
            self.policy_name = getattr(type(policy), "name", type(policy).__name__)
            self.policy = policy
        self._sessions: dict[str, _Session] = {}
        self._count = 0

    @classmethod
    def from_config(cls, config) -> "PoseIndex":
        """The index a ``WorldKVConfig`` asks for: its ``policy``, built by that class's
        ``from_config(config)`` (the ``fov`` policy reads the ``fov_*`` knobs)."""
        return cls(POLICIES.get(config.policy).from_config(config))

    # --- bookkeeping -----------------------------------------------------------------------

    def __len__(self) -> int:
        """Chunks indexed over all sessions."""
        return self._count

    def sessions(self) -> list[str]:
        return sorted(self._sessions)

    def chunks(self, session_id: str) -> list[int]:
        """Chunk ids of ``session_id``, ascending (empty for an unknown session)."""
        s = self._sessions.get(session_id)
        return [] if s is None else sorted(s.row_of)

    def __contains__(self, key: tuple[str, int]) -> bool:
        session_id, chunk_id = key
        s = self._sessions.get(session_id)
        return s is not None and chunk_id in s.row_of

    def mean_pose(self, session_id: str, chunk_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(t [3], R [3, 3])`` float64 copies of a chunk's label; ``KeyError`` when absent."""
        s = self._sessions.get(session_id)
        row = None if s is None else s.row_of.get(chunk_id)
        if row is None:
            raise KeyError(f"chunk {chunk_id!r} of session {session_id!r} is not in the pose index")
        return s.t[:, row].copy(), s.R[:, row].reshape(3, 3).copy()

    def add(self, session_id: str, chunk_id: int, frame_poses) -> None:
        """Index one chunk. frame_poses: [F, 4, 4] camera-to-world poses of its frames.
        A chunk id already present in the session raises ``ValueError``."""
        session_id, chunk_id = _check_session(session_id), _check_chunk_id(chunk_id)
        poses = validate_poses(frame_poses, f"frame_poses of chunk {chunk_id}")
        s = self._sessions.get(session_id)
        if s is not None and chunk_id in s.row_of:
            raise ValueError(f"chunk {chunk_id} of session {session_id!r} is already in the pose index")
        t, R = chunk_mean_pose(poses)
        self._session(session_id).append(np.array([chunk_id], dtype=np.int64), t[None], R[None])
        self._count += 1

    def add_many(self, session_id: str, chunk_ids: Iterable[int], frame_poses) -> None:
        """Index many chunks at once (e.g. restoring a bank). frame_poses: [N, F, 4, 4].
        All-or-nothing: a duplicate (in the batch or already indexed) raises ``ValueError``."""
        session_id = _check_session(session_id)
        ids = [_check_chunk_id(c) for c in chunk_ids]
        arr = np.asarray(frame_poses, dtype=np.float64)
        if arr.ndim != 4 or arr.shape[2:] != (4, 4) or arr.shape[0] != len(ids) or arr.shape[1] < 1:
            raise ValueError(f"frame_poses must have shape [N={len(ids)}, F, 4, 4] with F >= 1, got {list(arr.shape)}")
        if not ids:
            return
        validate_poses(arr.reshape(-1, 4, 4), "frame_poses (flattened N * F)")
        s = self._sessions.get(session_id)
        seen: set[int] = set()
        for cid in ids:
            if cid in seen or (s is not None and cid in s.row_of):
                raise ValueError(f"chunk {cid} of session {session_id!r} is already in the pose index")
            seen.add(cid)
        t = arr[:, :, :3, 3].mean(axis=1)  # [N, 3]
        R = arr[:, :, :3, :3].mean(axis=1)  # [N, 3, 3] element-wise mean, as chunk_mean_pose
        self._session(session_id).append(np.array(ids, dtype=np.int64), t, R)
        self._count += len(ids)

    def _session(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = _Session(getattr(self.policy, "prepare", None), self.policy.orthonormal)
        return s

    def remove(self, session_id: str, chunk_id: int) -> bool:
        """Drop one chunk; False when it was not indexed."""
        s = self._sessions.get(session_id)
        if s is None or not s.remove(chunk_id):
            return False
        self._count -= 1
        if s.n == 0:
            del self._sessions[session_id]
        return True

    def remove_session(self, session_id: str) -> int:
        """Drop every chunk of a session; returns how many there were."""
        s = self._sessions.pop(session_id, None)
        if s is None:
            return 0
        self._count -= s.n
        return s.n

    # --- retrieval -------------------------------------------------------------------------

    def _candidates(self, session_id: str, query_poses, exclude: Iterable[int]):
        """Policy inputs of a session: ``(session, cand_t, cand_R, q_t, q_R, valid)``, or None."""
        q = np.asarray(query_poses, dtype=np.float64)
        q_t, q_R = chunk_mean_pose(validate_poses(q if q.ndim == 3 else q[None], "query_poses"))
        s = self._sessions.get(session_id)
        if s is None or s.n == 0:
            return None
        valid = None
        rows = [s.row_of[c] for c in set(exclude) if c in s.row_of]
        if rows:  # a mask, not a copy: the candidate arrays stay views of the store
            valid = np.ones(s.n, dtype=bool)
            valid[rows] = False
        return s, s.cand_t(), s.cand_R(self.policy.orthonormal), q_t, q_R, valid

    def scores(self, session_id: str, query_poses, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk_ids [N] int64, scores [N] float64)`` of every chunk of the session, in storage
        order; excluded chunks score ``+inf`` and are left out of the policy's normalisation."""
        got = self._candidates(session_id, query_poses, exclude)
        if got is None:
            return np.empty(0, dtype=np.int64), np.empty(0)
        s, cand_t, cand_R, q_t, q_R, valid = got
        return s.ids[: s.n].copy(), self.policy.score(cand_t, cand_R, q_t, q_R, valid=valid)

    def query(self, session_id: str, query_poses, k: int, exclude: Iterable[int] = ()) -> list[int]:
        """The ``k`` best chunk ids of a session, best first.

        query_poses: [F, 4, 4] (or one [4, 4]) poses of the chunk about to be generated; their
        mean is the query. ``exclude`` ids (the sink and recent chunks) are never returned and do
        not count in the score normalisation. Fewer than ``k`` candidates returns them all;
        ties break by chunk id ascending.
        """
        k = check_int("k", k, 0)
        got = self._candidates(session_id, query_poses, exclude)
        if got is None or k == 0:
            return []
        s, cand_t, cand_R, q_t, q_R, valid = got
        if hasattr(self.policy, "shortlist"):
            extra = {} if s.prep is None else {"prepared": s.prep[..., : s.n]}
            rows, dist = self.policy.shortlist(cand_t, cand_R, q_t, q_R, int(k), valid=valid, **extra)
        else:
            dist = self.policy.score(cand_t, cand_R, q_t, q_R, valid=valid)
            rows = np.arange(s.n) if valid is None else np.flatnonzero(valid)
            dist = dist[rows] if valid is not None else dist
        k = min(int(k), rows.shape[0])
        if k == 0:
            return []
        if rows.shape[0] <= EXACT_SELECT:  # a few candidates: one sort by (score, id) beats the passes below
            return [cid for _, cid in sorted(zip(dist.tolist(), s.ids[rows].tolist()))[:k]]
        if k < dist.shape[0]:
            part = np.argpartition(dist, k - 1)
            kth = dist[part[k - 1]]
            # every row tied with the k-th score competes, so the id tie-break is exact
            pick = np.flatnonzero(dist <= kth) if np.count_nonzero(dist == kth) > 1 else part[:k]
        else:
            pick = np.arange(dist.shape[0])
        ids = s.ids[rows[pick]]
        order = np.lexsort((ids, dist[pick]))[:k]
        return ids[order].tolist()
