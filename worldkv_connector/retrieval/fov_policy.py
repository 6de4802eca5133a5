"""The ``fov`` retrieval policy: frustum overlap of the query's view samples with each candidate
camera, with a branch-and-bound shortlist over tiles of the samples for top-k queries."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from worldkv_connector.retrieval.policy import RetrievalPolicy, check_valid, orthonormalize, register_policy

__all__ = ["FovPolicy"]


@register_policy("fov")
@dataclass(frozen=True)
class FovPolicy(RetrievalPolicy):
    """Frustum overlap: ``1 - fraction of the query's view samples inside the candidate frustum``.

    A fixed, seeded set of ``rays`` view rays (uniform over the image plane) times ``depths``
    z-depths (bin centres of ``[near, far]``) is taken in the query camera once, moved to world
    and tested against each candidate camera: in its frame ``z in [near, far]``,
    ``|x / z| <= tan(hfov / 2)``, ``|y / z| <= tan(vfov / 2)`` with
    ``tan(vfov / 2) = tan(hfov / 2) / aspect``. Identical cameras score 0, disjoint views 1.
    Candidates need proper rotations (``orthonormal = True``).
    """

    fov_degrees: float = 90.0  # horizontal field of view
    aspect: float = 16.0 / 9.0  # width / height
    near: float = 0.1
    far: float = 10.0
    rays: int = 64
    depths: int = 4
    seed: int = 0
    block: int = 2048  # candidates per vectorised block (keeps the [M, 3, B] temporaries cache-sized)
    _points: np.ndarray = field(init=False, repr=False, compare=False)

    orthonormal = True

    @classmethod
    def from_config(cls, config) -> "FovPolicy":
        """The policy of a ``WorldKVConfig``: its ``fov_degrees``, ``fov_near`` and ``fov_far``."""
        return cls(fov_degrees=config.fov_degrees, near=config.fov_near, far=config.fov_far)

    def __post_init__(self) -> None:
        checks = {
            "fov_degrees": (self.fov_degrees, 1.0, 179.0),
            "aspect": (self.aspect, 1e-3, 1e3),
            "near": (self.near, 1e-9, 1e12),
            "far": (self.far, 1e-9, 1e12),
            "rays": (self.rays, 1, 1 << 16),
            "depths": (self.depths, 1, 1 << 10),
            "block": (self.block, 1, 1 << 24),
        }
        for name, (value, lo, hi) in checks.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
                raise ValueError(f"FovPolicy.{name}={value!r} is out of range: allowed {lo} <= {name} <= {hi}")
        for name in ("rays", "depths", "block", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"FovPolicy.{name}={getattr(self, name)!r}: expected an int")
        if self.far <= self.near:
            raise ValueError(f"FovPolicy.far={self.far} must be greater than near={self.near}")
        tan_h = math.tan(math.radians(self.fov_degrees) / 2)
        tan_v = tan_h / self.aspect
        rng = np.random.default_rng(self.seed)
        # margin keeps every sample strictly inside the query's own frustum, float32 rounding included
        uv = rng.uniform(-1.0, 1.0, size=(self.rays, 2)) * (1 - 1e-4)
        dirs = np.stack([uv[:, 0] * tan_h, uv[:, 1] * tan_v, np.ones(self.rays)], axis=1)  # z = 1
        z = self.near + (np.arange(self.depths) + 0.5) * (self.far - self.near) / self.depths
        pts = (dirs[:, None, :] * z[None, :, None]).reshape(-1, 3)  # [M, 3] query camera frame
        object.__setattr__(self, "_points", pts)
        object.__setattr__(self, "_tan", (tan_h, tan_v))
        # every point of a frustum lies within this distance of its camera centre
        object.__setattr__(self, "_reach", self.far * math.sqrt(1 + tan_h**2 + tan_v**2))
        normals = np.array([[1.0, 0, -tan_h], [-1.0, 0, -tan_h], [0, 1.0, -tan_v], [0, -1.0, -tan_v],
                            [0, 0, -1.0], [0, 0, 1.0]])  # [6, 3] faces: inside iff n . p_local <= b
        scale = np.linalg.norm(normals, axis=1)
        object.__setattr__(self, "_unit_normals", normals / scale[:, None])
        object.__setattr__(self, "_unit_bound", np.array([0.0, 0.0, 0.0, 0.0, -self.near, self.far]) / scale)
        object.__setattr__(self, "_tiles", (self._make_tiles(uv, z, 1), self._make_tiles(uv, z, 2)))

    def _make_tiles(self, uv: np.ndarray, z: np.ndarray, splits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tiles of the samples: per depth, the image split into splits x splits parts, each tile
        the rectangle (at that depth, edges along the camera's x and y) around its samples.
        Returns (centres [T, 3] query frame, half sizes [T, 2] along x and y, counts [T] float32)."""
        tan_h, tan_v = self._tan
        cell = np.minimum(((uv + 1.0) * 0.5 * splits).astype(np.int64), splits - 1)  # [rays, 2]
        centres, halves, counts = [], [], []
        for depth in z:
            for cu in range(splits):
                for cv in range(splits):
                    mine = (cell[:, 0] == cu) & (cell[:, 1] == cv)
                    if not mine.any():
                        continue
                    lo, hi = uv[mine].min(axis=0), uv[mine].max(axis=0)
                    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
                    centres.append([mid[0] * tan_h * depth, mid[1] * tan_v * depth, depth])
                    halves.append([half[0] * tan_h * depth, half[1] * tan_v * depth])
                    counts.append(float(np.count_nonzero(mine)))
        return np.array(centres), np.array(halves), np.array(counts, dtype=np.float32)

    @property
    def points(self) -> np.ndarray:
        """[rays * depths, 3] sample points in the query camera frame (read-only copy)."""
        return self._points.copy()

    def _world_samples(self, q_t, q_R) -> tuple[np.ndarray, np.ndarray]:
        """The query's sample points in world [M, 3] and its frustum's 8 corners in world [8, 3]."""
        rot = orthonormalize(q_R)
        q_t = np.asarray(q_t, dtype=np.float64)
        tan_h, tan_v = self._tan
        corners = np.array([[sx * z * tan_h, sy * z * tan_v, z] for z in (self.near, self.far)
                            for sx in (-1.0, 1.0) for sy in (-1.0, 1.0)])
        return self._points @ rot.T + q_t, corners @ rot.T + q_t

    def _near_rows(self, cand_t, world, valid, radius: bool = False):
        """Rows whose frustum can reach a sample (exact shortcut: every point of a candidate frustum
        lies within ``reach`` of its centre, so a candidate farther than reach + r0 from the
        samples' centre c0 sees none of them)."""
        c0 = world.mean(axis=0)
        r0 = float(np.sqrt(((world - c0) ** 2).sum(axis=1)).max())
        d2 = sum((cand_t[:, j] - c0[j]) ** 2 for j in range(3))  # [N], column-wise: no [N, 3] temp
        near = d2 <= (self._reach + r0) ** 2 * (1 + 1e-9)
        if valid is not None:
            near &= valid
        return (np.flatnonzero(near), r0) if radius else np.flatnonzero(near)

    def _separated(self, corners, t, R) -> np.ndarray:
        """[B] bool: the query frustum (convex hull of ``corners`` [8, 3]) lies entirely outside one
        face plane of the candidate frustum, so no sample can be inside it (exact, with a margin
        far above the float32 rounding of the inside test). t: [B, 3], R: [B, 3, 3]."""
        tan_h, tan_v = self._tan
        # face k of a candidate: inside iff normal_k . p_local <= bound_k, p_local = R^T (p - t);
        # in world terms w_k . p <= bound_k + w_k . t with w_k = R normal_k
        normals = np.array([[1.0, 0, -tan_h], [-1.0, 0, -tan_h], [0, 1.0, -tan_v], [0, -1.0, -tan_v],
                            [0, 0, -1.0], [0, 0, 1.0]])  # [6, 3]
        bound = np.array([0.0, 0.0, 0.0, 0.0, -self.near, self.far])
        w = np.einsum("bij,kj->ikb", R, normals)  # [3, 6, B]
        off = bound[:, None] + np.einsum("ikb,bi->kb", w, t)  # [6, B]
        vals = (corners @ w.reshape(3, -1)).reshape(8, 6, -1) - off  # [8, 6, B]: > 0 outside
        tol = 1e-5 * (1.0 + np.abs(off))  # far above float32 rounding of the inside test
        return (vals > tol).all(axis=0).any(axis=0)

    @staticmethod
    def _homogeneous(world: np.ndarray) -> np.ndarray:
        """[M, 4] float32 homogeneous world samples: float32 halves the memory traffic of the
        [M, 3, B] block (a sample within ~1e-6 relative of a frustum face may flip)."""
        wh = np.ones((world.shape[0], 4), dtype=np.float32)
        wh[:, :3] = world
        return wh

    def _fractions(self, wh, t, R) -> np.ndarray:
        """Inside fractions [B] of the samples ``wh`` (``_homogeneous``) for candidates t [B, 3], R [B, 3, 3]."""
        m = t.shape[0]
        out = np.empty(m)
        for lo in range(0, m, self.block):
            hi = lo + self.block
            out[lo:hi] = self._inside_fraction(wh, t[lo:hi], R[lo:hi])
        return out

    def score(self, cand_t, cand_R, q_t, q_R, valid=None) -> np.ndarray:
        n = cand_t.shape[0]
        valid = check_valid(n, valid)
        world, _ = self._world_samples(q_t, q_R)
        out = np.ones(n)
        rows = self._near_rows(cand_t, world, valid)
        if rows.size:
            out[rows] = 1.0 - self._fractions(self._homogeneous(world), cand_t[rows], cand_R[rows])
        if valid is not None:
            out[~valid] = np.inf
        return out

    def prepare(self, cand_t: np.ndarray, cand_R: np.ndarray) -> np.ndarray:
        """Per-chunk frustum planes, computed once at insert: ``[4, 6, N]`` float32 where
        ``[:3, k, c]`` is the unit world normal of face k of candidate c and ``[3, k, c]`` its
        offset, so a world point p is outside face k by ``p . n - offset`` (a signed distance).
        cand_t: [N, 3], cand_R: [N, 3, 3] proper rotations."""
        cand_t = np.asarray(cand_t, dtype=np.float64)
        w = np.einsum("nij,kj->ikn", np.asarray(cand_R, dtype=np.float64), self._unit_normals)  # [3, 6, N]
        out = np.empty((4, 6, cand_t.shape[0]), dtype=np.float32)
        out[:3] = w
        out[3] = self._unit_bound[:, None] + np.einsum("ikn,ni->kn", w, cand_t)
        return out

    def _tile_bound(self, planes: np.ndarray, tiles: tuple, tol: float) -> np.ndarray:
        """Upper bound [m] on the samples inside each candidate: the sum of the counts of the tiles
        that no face separates from the candidate. planes: [4, 6, m] (``prepare``); tiles: one
        level of ``_query_tiles``.

        The smallest distance to face k over a tile's rectangle (centre c, half sizes s1, s2 along
        the query camera's x and y axes X, Y) is exactly ``n . c - offset - s1 |n . X| - s2 |n . Y|``,
        so one GEMM of the tiles' ``[c, -1, -s1, -s2]`` rows with the candidates' ``[n, offset,
        |n . X|, |n . Y|]`` columns gives every (tile, face, candidate) distance at once."""
        rows, counts, xy = tiles
        n_tiles, m = rows.shape[0], planes.shape[2]
        cols = np.empty((6, 6, m), dtype=np.float32)
        cols[:4] = planes
        np.abs(xy @ planes[:3].reshape(3, -1), out=cols[4:].reshape(2, -1))
        dist = (rows @ cols.reshape(6, -1)).reshape(n_tiles, 6, m)
        worst = np.maximum.reduce(dist, axis=1)  # [T, m]: > tol, some face leaves the tile outside
        return counts @ (worst <= tol).astype(np.float32)

    def _query_tiles(self, q_t: np.ndarray, rot: np.ndarray) -> tuple[tuple, tuple]:
        """The two tile levels of the query (position q_t, proper rotation rot) in world, as
        ``_tile_bound`` takes them: ((rows [T, 6] float32, counts [T], X and Y [2, 3] float32), ...)."""
        xy = np.ascontiguousarray(rot[:, :2].T, dtype=np.float32)
        out = []
        for centres, halves, counts in self._tiles:
            rows = np.empty((centres.shape[0], 6), dtype=np.float32)
            rows[:, :3] = centres @ rot.T + q_t
            rows[:, 3] = -1.0
            rows[:, 4:] = -halves
            out.append((rows, counts, xy))
        return tuple(out)

    def shortlist(
        self, cand_t, cand_R, q_t, q_R, k: int, valid=None, prepared=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, dist)`` holding every row whose score is at most the k-th smallest, with the
        exact scores of ``score``. prepared: ``prepare(cand_t, cand_R)`` kept by the index
        (computed here when None).

        Branch and bound on the sample count (score = 1 - count / M): the samples are grouped
        into tiles (per depth, a box around the samples of one part of the image); a tile that
        one face plane of a candidate leaves entirely outside (by a margin far above the
        float32 rounding of the sample test) contributes none of its samples, so the counts of
        the other tiles bound the candidate's count from above. Candidates are visited by
        decreasing coarse bound (one tile per depth), the fine bound (2 x 2 tiles per depth)
        filters each block, and only candidates whose bound reaches the k-th best exact count
        found so far get the exact sample test. A skipped candidate's count is below that k-th
        best, so the returned rows hold the true top k with all its ties. When fewer than k
        candidates see a sample, every valid row is returned (ties at 1 break by id)."""
        n = cand_t.shape[0]
        valid = check_valid(n, valid)
        every = (lambda: np.arange(n)) if valid is None else (lambda: np.flatnonzero(valid))
        if k <= 0:
            return every(), self.score(cand_t, cand_R, q_t, q_R, valid)[every()]
        rot = orthonormalize(q_R)  # once per query: the samples, the tiles and the first block use it
        q_t = np.asarray(q_t, dtype=np.float64)
        world = self._points @ rot.T + q_t
        wh = self._homogeneous(world)
        rows, r0 = self._near_rows(cand_t, world, valid, radius=True)
        if prepared is None:
            prepared = self.prepare(cand_t[rows], cand_R[rows])
            local = True
        else:
            local = False
        coarse, fine = self._query_tiles(q_t, rot)
        # every near candidate lies within reach + r0 of the samples: this bounds all coordinates
        tol = 1e-3 * (1.0 + float(np.abs(world).max()) + 2.0 * (self._reach + r0))
        m_samples = world.shape[0]
        if local:
            bound = self._tile_bound(prepared, coarse, tol)
        elif rows.size * 2 >= n:  # most rows are near: no gather, bound them in place
            bound = self._tile_bound(prepared, coarse, tol)[rows]
        else:
            bound = self._tile_bound(prepared[:, :, rows], coarse, tol)
        # visit by decreasing coarse bound (small ints: a stable radix sort); the first block is
        # the 64 of the top level whose frustum centre is nearest the query's, so the k-th best
        # count (the pruning threshold) is high from the start
        level = bound.astype(np.int16 if m_samples < (1 << 15) else np.int64)
        order = np.argsort(-level, kind="stable")
        order = order[: int(np.count_nonzero(level >= 1))]
        if order.size > 64:
            top = order[: int(np.count_nonzero(level == level[order[0]]))]
            if top.size > 64:
                mid = 0.5 * (self.near + self.far)
                fq = rot[:, 2]
                ct, fc = cand_t[rows[top]], cand_R[rows[top], :, 2]
                d2 = sum((ct[:, j] + mid * (fc[:, j] - fq[j]) - q_t[j]) ** 2 for j in range(3))
                order[: top.size] = top[np.argpartition(d2, 63)]
        bound = bound[order]
        # order / pos index into rows; cand are candidate rows
        got_pos = []
        tau, start, blk, seen = 1.0, 0, 64, np.empty(0)
        while start < order.size and bound[start] >= tau:
            stop = min(start + blk, order.size)
            pos = order[start:stop][bound[start:stop] >= tau]
            cand = rows[pos]
            fine_bound = self._tile_bound(prepared[:, :, pos if local else cand], fine, tol)
            pos, cand = pos[fine_bound >= tau], cand[fine_bound >= tau]
            if cand.size:
                frac = self._fractions(wh, cand_t[cand], cand_R[cand])
                got_pos.append(cand)
                seen = np.concatenate([seen, frac])
                if seen.size >= k:
                    kth = float(np.partition(seen, seen.size - k)[seen.size - k]) * m_samples
                    tau = max(tau, round(kth))
            start, blk = stop, 1024
        got = np.concatenate(got_pos) if got_pos else np.empty(0, dtype=np.int64)
        dist = 1.0 - seen
        if np.count_nonzero(dist < 1.0) >= k:
            return got, dist
        rows_all = every()
        full = np.ones(n)
        full[got] = dist
        return rows_all, full[rows_all]

    def _inside_fraction(self, wh: np.ndarray, t: np.ndarray, R: np.ndarray) -> np.ndarray:
        """wh: [M, 4] float32 homogeneous world points; t: [B, 3], R: [B, 3, 3] -> [B] fractions."""
        b = t.shape[0]
        tan_h, tan_v = self._tan
        # local = R^T (p - t): as one GEMM [M, 4] @ [4, 3, B] with the offset -R^T t in the last row
        # and x, y pre-divided by tan(fov/2) so the side tests become |x'| <= z, |y'| <= z
        a = np.empty((4, 3, b))
        a[:3] = R.transpose(1, 2, 0)  # a[i, j, c] = R_c[i, j]
        a[3] = -np.einsum("ci,cij->jc", t, R)
        a[:, 0] /= tan_h
        a[:, 1] /= tan_v
        local = (wh @ a.reshape(4, 3 * b).astype(np.float32)).reshape(-1, 3, b)  # [M, 3, B]
        x, y, z = local[:, 0], local[:, 1], local[:, 2]
        side = np.maximum(np.abs(x), np.abs(y))
        inside = (side <= z) & (z >= self.near) & (z <= self.far)
        return np.count_nonzero(inside, axis=0) / wh.shape[0]
