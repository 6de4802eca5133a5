"""The ``pose`` retrieval policy: the WorldKV reference's distance (translation + rotation angle,
each normalised over the candidates), with an exact lower-bound shortlist for top-k queries."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worldkv_connector.retrieval.policy import RetrievalPolicy, check_valid, register_policy

__all__ = ["PosePolicy"]

EXACT_ROWS = 64  # shortlists of at most this many candidates score every row exactly
SEED_SAMPLE = 2048  # rows of the strided sample whose best bounds seed the shortlist's threshold


@register_policy("pose")
@dataclass(frozen=True)
class PosePolicy(RetrievalPolicy):
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
        np.clip(cos, -1.0, 1.0, out=cos)  # one pass (a min and a max would be two over 100k rows)
        # the peaks by the ufuncs' reduce (ndarray.max adds a Python wrapper per call)
        where = True if valid is None else valid
        peak_t = float(np.maximum.reduce(trans, initial=0.0, where=where))
        # arccos is decreasing, so the largest angle is the angle of the smallest cosine
        peak_r = float(np.arccos(np.minimum.reduce(cos, initial=1.0, where=where)))
        a = 0.5 / peak_t if peak_t > 0 else 0.5
        b = 0.5 / peak_r if peak_r > 0 else 0.5
        return trans, cos, a, b

    def score(self, cand_t, cand_R, q_t, q_R, valid=None) -> np.ndarray:
        valid = check_valid(cand_t.shape[0], valid)
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
        bound of the score. ``tau`` = the largest exact score of any k rows is >= the k-th best
        score, so only rows with ``low <= tau`` can be in the top k and only they get an arccos;
        the k rows with the lowest bound in a strided sample (``_seed_rows``) give a tight ``tau``
        at a fraction of the cost of selecting over every row. Up to ``EXACT_ROWS`` candidates every row gets its exact score: the
        bound's extra passes cost more than the arccos they save there.
        """
        n = cand_t.shape[0]
        valid = check_valid(n, valid)
        trans, cos, a, b = self._parts(cand_t, cand_R, q_t, q_R, valid)
        trans *= a
        live = n if valid is None else int(np.count_nonzero(valid))
        if 0 < k < live and n > EXACT_ROWS:
            low = np.subtract(1.0, cos)
            low *= 2.0
            np.sqrt(low, out=low)
            low *= b
            low += trans
            if valid is not None:
                low[~valid] = np.inf
            seed = _seed_rows(low, k)
            tau = float((np.arccos(cos[seed]) * b + trans[seed]).max())
            # slack: where the bound is tight (tiny angles) rounding may put low an ulp above dist
            rows = np.flatnonzero(low <= tau * (1 + 1e-9) + 1e-12)
        else:
            rows = np.arange(n) if valid is None else np.flatnonzero(valid)
        dist = np.arccos(cos[rows]) * b + trans[rows]
        return rows, dist


def _seed_rows(low: np.ndarray, k: int) -> np.ndarray:
    """k rows with finite, small ``low``: the k smallest of every ``n // SEED_SAMPLE``-th row (a
    selection over all rows costs about a millisecond at 100,000, the sample's a few
    microseconds), or of all rows when the sample holds fewer than k finite bounds (most rows
    excluded). ``low`` must hold at least k finite entries."""
    step = low.shape[0] // SEED_SAMPLE
    if step > 1 and k <= SEED_SAMPLE:
        sample = low[::step]
        best = np.argpartition(sample, k - 1)[:k]
        if np.isfinite(sample[best]).all():
            return best * step
    return np.argpartition(low, k - 1)[:k]
