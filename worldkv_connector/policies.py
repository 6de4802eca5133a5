"""Retrieval scoring policies behind a name registry (``pose``, ``fov``).

A policy scores candidate chunks against the query chunk; **lower is better**. Interface::

    score(cand_t [N, 3], cand_R [N, 3, 3], q_t [3], q_R [3, 3], valid=None) -> [N] float64

All arrays are float64 numpy (camera-to-world, OpenCV axes, see ``worldkv_connector.poses``).
``valid`` is an optional ``[N]`` bool mask: rows outside it score ``+inf`` and take no part in
any normalisation over the candidates (the index uses it for sink/recent exclusion without
copying the candidate arrays). A policy may also offer
``shortlist(cand_t, cand_R, q_t, q_R, k, valid=None) -> (rows, dist)``, a subset of rows holding
the k best with their exact scores, which ``PoseIndex.query`` then uses instead of ``score``.
A policy whose ``orthonormal`` attribute is true wants proper
rotations in ``cand_R`` (``PoseIndex`` passes the SVD-orthonormalised chunk means); otherwise it
gets the raw element-wise mean rotation, as the WorldKV reference uses. A new policy is one class
decorated with ``@register_policy("name")``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["POLICIES", "register_policy", "get_policy", "PosePolicy", "FovPolicy", "orthonormalize"]

POLICIES: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator adding a scoring policy to ``POLICIES`` under ``name``."""

    def deco(cls: type) -> type:
        if name in POLICIES:
            raise ValueError(f"scoring policy {name!r} is already registered ({POLICIES[name].__name__})")
        POLICIES[name] = cls
        cls.name = name
        return cls

    return deco


def get_policy(name: str, **kwargs):
    """An instance of the registered policy ``name`` built with ``kwargs``."""
    if name not in POLICIES:
        raise ValueError(f"unknown scoring policy {name!r}: choose one of {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)


def orthonormalize(rot: np.ndarray) -> np.ndarray:
    """Nearest proper rotation (SVD, det +1) of each matrix. rot: [..., 3, 3] -> same shape."""
    u, _, vt = np.linalg.svd(np.asarray(rot, dtype=np.float64))
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)  # degenerate mean (e.g. opposite views averaged): keep U V^T
    u = u.copy()
    u[..., :, 2] *= d[..., None]
    return u @ vt


def _mask_inputs(n: int, valid) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n,):
        raise ValueError(f"valid must have shape [{n}], got {list(valid.shape)}")
    return valid


@register_policy("pose")
@dataclass(frozen=True)
class PosePolicy:
    """The WorldKV retrieval distance, exactly as the reference computes it.

    ``trans = ||t_c - t_q||^2``, ``rot = arccos(clamp((trace(R_c^T R_q) - 1) / 2, -1, 1))``;
    each is divided by its maximum over the (valid) candidates when that maximum is > 0;
    ``dist = 0.5 * trans + 0.5 * rot``. ``R_c`` is the non-orthonormalised mean rotation.
    """

    orthonormal = False

    def _parts(self, cand_t, cand_R, q_t, q_R, valid):
        """Raw ``trans [N]``, clamped cosine ``cos [N]`` and the scales ``a``, ``b`` such that
        ``dist = trans * a + arccos(cos) * b`` (0.5 over each term's maximum, or 0.5 if that is 0)."""
        n = cand_t.shape[0]
        q_t = np.asarray(q_t, dtype=np.float64)
        # trans = ||t_c - t_q||^2 as [3, N] (contiguous rows when cand_t is a transposed [3, N]
        # store, as PoseIndex keeps it) and one fused einsum reduction
        diff = cand_t.T - q_t[:, None]
        trans = np.einsum("ij,ij->j", diff, diff)
        # trace(R_c^T R_q) = sum_ij R_c[i, j] * R_q[i, j]: one mat-vec over the flattened blocks
        # (einsum, not BLAS: see PoseIndex's store layout)
        cos = np.einsum("ij,j->i", cand_R.reshape(n, 9), np.asarray(q_R, dtype=np.float64).reshape(9))
        cos -= 1.0
        cos *= 0.5
        np.clip(cos, -1.0, 1.0, out=cos)
        peak_t = trans.max(initial=0.0, where=True if valid is None else valid)
        # arccos is decreasing, so the largest angle is the angle of the smallest cosine
        peak_r = float(np.arccos(cos.min(initial=1.0, where=True if valid is None else valid)))
        a = 0.5 / peak_t if peak_t > 0 else 0.5
        b = 0.5 / peak_r if peak_r > 0 else 0.5
        return trans, cos, a, b

    def score(self, cand_t, cand_R, q_t, q_R, valid=None) -> np.ndarray:
        valid = _mask_inputs(cand_t.shape[0], valid)
        trans, cos, a, b = self._parts(cand_t, cand_R, q_t, q_R, valid)
        dist = np.arccos(cos, out=cos)
        dist *= b
        trans *= a
        dist += trans
        if valid is not None:
            dist[~valid] = np.inf
        return dist

    def shortlist(self, cand_t, cand_R, q_t, q_R, k: int, valid=None) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [m], dist [m])``: a subset of the valid rows that holds every row whose score is
        at most the k-th smallest (ties included), with the exact scores of ``score``.

        Why: arccos over every candidate dominates a query. Since ``theta >= 2 sin(theta / 2)
        = sqrt(2 (1 - cos theta))``, ``low = trans * a + sqrt(2 (1 - cos)) * b`` is a cheap lower
        bound of the score. ``tau`` = the largest exact score of the k rows with the lowest bound
        is >= the k-th best score, so only rows with ``low <= tau`` can be in the top k and only
        they get an arccos.
        """
        n = cand_t.shape[0]
        valid = _mask_inputs(n, valid)
        trans, cos, a, b = self._parts(cand_t, cand_R, q_t, q_R, valid)
        trans *= a
        live = n if valid is None else int(np.count_nonzero(valid))
        if 0 < k < live:
            low = np.subtract(1.0, cos)
            low *= 2.0
            np.sqrt(low, out=low)
            low *= b
            low += trans
            if valid is not None:
                low[~valid] = np.inf
            seed = np.argpartition(low, k - 1)[:k]
            tau = float((np.arccos(cos[seed]) * b + trans[seed]).max())
            # slack: where the bound is tight (tiny angles) rounding may put low an ulp above dist
            rows = np.flatnonzero(low <= tau * (1 + 1e-9) + 1e-12)
        else:
            rows = np.arange(n) if valid is None else np.flatnonzero(valid)
        dist = np.arccos(cos[rows]) * b + trans[rows]
        return rows, dist


@register_policy("fov")
@dataclass(frozen=True)
class FovPolicy:
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

    def _near_rows(self, cand_t, world, valid) -> np.ndarray:
        """Rows whose frustum can reach a sample (exact shortcut: every point of a candidate frustum
        lies within ``reach`` of its centre, so a candidate farther than reach + r0 from the
        samples' centre c0 sees none of them)."""
        c0 = world.mean(axis=0)
        r0 = float(np.sqrt(((world - c0) ** 2).sum(axis=1)).max())
        d2 = sum((cand_t[:, j] - c0[j]) ** 2 for j in range(3))  # [N], column-wise: no [N, 3] temp
        near = d2 <= (self._reach + r0) ** 2 * (1 + 1e-9)
        if valid is not None:
            near &= valid
        return np.flatnonzero(near)

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

    def _fractions(self, world, t, R) -> np.ndarray:
        """Inside fractions [B] of the world samples for candidates t [B, 3], R [B, 3, 3]."""
        # world points in homogeneous coordinates; float32 halves the memory traffic of the
        # [M, 3, B] block (a sample within ~1e-6 relative of a frustum face may flip)
        wh = np.concatenate([world, np.ones((world.shape[0], 1))], axis=1).astype(np.float32)  # [M, 4]
        m = t.shape[0]
        out = np.empty(m)
        for lo in range(0, m, self.block):
            hi = lo + self.block
            out[lo:hi] = self._inside_fraction(wh, t[lo:hi], R[lo:hi])
        return out

    def score(self, cand_t, cand_R, q_t, q_R, valid=None) -> np.ndarray:
        n = cand_t.shape[0]
        valid = _mask_inputs(n, valid)
        world, _ = self._world_samples(q_t, q_R)
        out = np.ones(n)
        rows = self._near_rows(cand_t, world, valid)
        if rows.size:
            out[rows] = 1.0 - self._fractions(world, cand_t[rows], cand_R[rows])
        if valid is not None:
            out[~valid] = np.inf
        return out

    def shortlist(self, cand_t, cand_R, q_t, q_R, k: int, valid=None) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, dist)`` holding every row whose score is at most the k-th smallest, with the
        exact scores of ``score``. Rows out of reach or whose frustum is separated from the
        query's by one of its face planes see no sample (score exactly 1) and skip the sample
        test; when the rows that do see samples hold k scores below 1 they are the answer,
        otherwise every valid row is returned (the ties at 1 break by id)."""
        n = cand_t.shape[0]
        valid = _mask_inputs(n, valid)
        world, corners = self._world_samples(q_t, q_R)
        rows = self._near_rows(cand_t, world, valid)
        if rows.size:
            rows = rows[~self._separated(corners, cand_t[rows], cand_R[rows])]
        dist = 1.0 - self._fractions(world, cand_t[rows], cand_R[rows]) if rows.size else np.empty(0)
        if np.count_nonzero(dist < 1.0) >= k > 0:
            return rows, dist
        every = np.arange(n) if valid is None else np.flatnonzero(valid)
        full = np.ones(n)
        full[rows] = dist
        return every, full[every]

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
