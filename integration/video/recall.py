"""Attention recall: how much of full-history attention the window actually holds (a diagnostic).

With ``EngineArgs.eval_attention_recall`` the engine keeps a *shadow full-KV history*: a dense copy
of every committed chunk's keys, per layer, uncompressed, at their original positions (what a
full-KV run would attend to). On the clean pass of each chunk, for each layer, it computes
``softmax(q K_full^T * scale)`` over [every committed chunk of the session + the current chunk]
and sums the probability mass on the tokens the window holds:

- sink and recent chunks, and the current chunk: all their tokens;
- external (retrieved) chunks: only their kept tokens (the connector's ``kept_indices(session,
  chunk) -> [L, T']`` when it has one, else every token of the chunk);
- everything else (chunks the window forgot): nothing.

The mean over queries and heads is the layer's *attention recall*; 1.0 means the window loses
nothing full attention would look at. ``full`` is 1.0 by construction; a sliding window without
retrieval drops the mass on forgotten chunks. The shadow history costs memory (all keys of the
rollout, on the KV device) and one dense attention per layer per chunk, so it is off by default;
when off nothing of this module runs.

**Revisit chunk** (defined here once, used by ``worldkv generate`` and ``worldkv demo``): chunk
``c`` revisits chunk ``j`` when ``j`` was a retrieval candidate for ``c`` (neither a sink chunk
nor in ``c``'s recent window: ``sink_chunks <= j < c - recent_chunks``), their mean poses are
*close* (rotation angle <= ``max_degrees`` and translation <= ``max_distance``) and the camera
*went away in between* (some chunk between ``j`` and ``c`` is not close to ``c``). The last
condition keeps a slow pan or a held pose from counting as a return: a revisit is coming back to
a place after leaving it.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["attention_mass", "RecallTracker", "RecallProbe", "revisit_sources", "recall_summary",
           "REVISIT_DEGREES", "REVISIT_DISTANCE"]

logger = logging.getLogger(__name__)

REVISIT_DEGREES = 30.0  # rotation tolerance of a revisit (module docstring)
REVISIT_DISTANCE = 0.5  # translation tolerance, in trajectory units (a W/S/A/D op moves 1.0)

KeptFn = Callable[[str, int], "torch.Tensor | None"]


def attention_mass(q: torch.Tensor, k: torch.Tensor, held: torch.Tensor, scale: float | None = None) -> float:
    """Share of softmax attention mass on the ``held`` keys, mean over queries and heads.

    q: [Tq, Hq, D]; k: [Tk, Hkv, D] (Hq a multiple of Hkv: GQA), any float dtype, one device;
    held: [Tk] bool on any device. ``scale`` defaults to D**-0.5. Computed in fp32 as
    ``exp(logsumexp(held logits) - logsumexp(all logits))`` per query and head. Returns a float in
    [0, 1] (0.0 when nothing is held, exactly 1.0 when everything is).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q [Tq, Hq, D] and k [Tk, Hkv, D] with Hq % Hkv == 0 expected, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if held.dim() != 1 or held.shape[0] != k.shape[0] or held.dtype != torch.bool:
        raise ValueError(f"held: expected [Tk={k.shape[0]}] bool, got {held.dtype} {tuple(held.shape)}")
    if bool(held.all()):
        return 1.0
    if not bool(held.any()):
        return 0.0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float()
    if q.shape[1] != k.shape[1]:
        kf = kf.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("thd,nhd->htn", q.float(), kf) * scale  # [Hq, Tq, Tk]
    total = torch.logsumexp(logits, dim=-1)
    kept = torch.logsumexp(logits[..., held.to(logits.device)], dim=-1)
    return float(torch.exp(kept - total).mean())


class RecallTracker:
    """Shadow full-KV history and per-chunk recall of one engine.

    num_layers: layers of the model. kept_fn(session_id, chunk_id) -> [L, T'] int64 kept token ids
    of an external chunk, or None (then all its tokens count as held); set by the engine from the
    connector's ``kept_indices`` when it has one.
    """

    def __init__(self, num_layers: int, kept_fn: KeptFn | None = None) -> None:
        self.num_layers = num_layers
        self.kept_fn = kept_fn
        # session -> chunk id -> per layer K [T, Hkv, D] (model dtype, KV device), in commit order
        self._shadow: dict[str, dict[int, list[torch.Tensor | None]]] = {}
        self._recall: dict[tuple[str, int], list[float | None]] = {}
        self._pending: list[tuple] = []  # this step's clean-pass observations

    def _held(self, session_id: str, chunk_id: int, layer: int, kind: str | None, tokens: int) -> torch.Tensor:
        if kind in ("sink", "recent"):
            return torch.ones(tokens, dtype=torch.bool)
        if kind != "external":
            return torch.zeros(tokens, dtype=torch.bool)
        idx = self.kept_fn(session_id, chunk_id) if self.kept_fn is not None else None
        if idx is None:
            return torch.ones(tokens, dtype=torch.bool)
        held = torch.zeros(tokens, dtype=torch.bool)
        held[idx[layer].cpu().long()] = True
        return held

    def begin_step(self) -> None:
        """Forget observations of a step that did not finish (an exception inside it)."""
        self._pending.clear()

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, plan) -> None:
        """Clean pass of ``layer``: q, k [B, T, H, D] of the current chunks (post-RoPE), ``plan``
        the step's WindowPlan (after any load-error drops). Only copies what the measurement needs;
        :meth:`finish_step` measures after the step, outside its timing."""
        for row, segments in enumerate(plan.rows):
            kinds = {s.chunk_id: s.kind for s in segments if s.kind != "current"}
            self._pending.append((plan.session_ids[row], plan.committed[row].chunk_id, layer, kinds,
                                  q[row].detach().clone(), k[row].detach().clone()))

    def finish_step(self) -> None:
        """Measure the recall of every layer observed this step and add the chunks' keys to their
        sessions' shadow histories (all layers of a chunk are measured before it joins)."""
        pending, self._pending = self._pending, []
        for sid, chunk, layer, kinds, q, cur in pending:
            shadow = self._shadow.setdefault(sid, {})
            keys, held = [], []
            for cid, per_layer in shadow.items():
                keys.append(per_layer[layer])
                held.append(self._held(sid, cid, layer, kinds.get(cid), per_layer[layer].shape[0]))
            keys.append(cur)
            held.append(torch.ones(cur.shape[0], dtype=torch.bool))
            mask = torch.cat(held)
            # everything held (a full window): exactly 1.0 without building the history
            value = 1.0 if bool(mask.all()) else attention_mass(q, torch.cat(keys), mask)
            self._recall.setdefault((sid, chunk), [None] * self.num_layers)[layer] = value
        for sid, chunk, layer, _, _, cur in pending:
            self._shadow[sid].setdefault(chunk, [None] * self.num_layers)[layer] = cur

    def take(self, session_id: str, chunk_id: int) -> list[float] | None:
        """Per-layer recall of a chunk (removed from the tracker); None if it was not observed."""
        values = self._recall.pop((session_id, chunk_id), None)
        if values is None or any(v is None for v in values):
            return None
        return [float(v) for v in values]

    def end_session(self, session_id: str) -> None:
        """Drop a finished session's shadow history."""
        self._shadow.pop(session_id, None)

    def shadow_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._shadow.values() for ls in s.values()
                   for t in ls if t is not None)


class RecallProbe:
    """An ``attn_fn`` that runs the step's attention, then, on the clean pass, hands q, k and the
    window to a RecallTracker. Built per step by the model runner only when recall is on."""

    def __init__(self, attention, tracker: RecallTracker) -> None:
        self.attention = attention
        self.tracker = tracker
        tracker.begin_step()

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.attention(layer_idx, q, k, v)
        # after the call: a load error may have dropped external chunks from the plan
        if self.attention.metadata.is_clean_pass:
            self.tracker.observe(layer_idx, q, k, self.attention.plan)
        return out


# --- revisits and summaries -------------------------------------------------------------------
def _rotation_degrees(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Angle between rotations ra [N, 3, 3] and rb [3, 3] in degrees (mean matrices are accepted)."""
    cos = (np.einsum("nij,ij->n", ra, rb) - 1.0) / 2.0  # trace(Ra^T Rb) = sum(Ra * Rb)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def revisit_sources(chunk_poses: np.ndarray, sink_chunks: int, recent_chunks: int, *,
                    max_degrees: float = REVISIT_DEGREES, max_distance: float = REVISIT_DISTANCE) -> list[list[int]]:
    """For each chunk, the earlier chunks it revisits (module docstring); empty: not a revisit.

    chunk_poses: [N, 4, 4] mean camera-to-world pose per chunk (ChunkResult.pose).
    """
    poses = np.asarray(chunk_poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"chunk_poses: expected [N, 4, 4], got {list(poses.shape)}")
    if max_degrees < 0 or max_distance < 0:
        raise ValueError(f"max_degrees={max_degrees}, max_distance={max_distance}: expected >= 0")
    out: list[list[int]] = []
    for c in range(poses.shape[0]):
        rot = _rotation_degrees(poses[:c, :3, :3], poses[c, :3, :3])
        dist = np.linalg.norm(poses[:c, :3, 3] - poses[c, :3, 3], axis=1)
        close = (rot <= max_degrees + 1e-9) & (dist <= max_distance + 1e-9)
        sources = []
        for j in range(sink_chunks, c - recent_chunks):
            if close[j] and not close[j + 1 : c].all():  # close, and the camera left in between
                sources.append(j)
        out.append(sources)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def recall_summary(sessions: Sequence[tuple[np.ndarray, Sequence[list[float] | None]]], sink_chunks: int,
                   recent_chunks: int, *, max_degrees: float = REVISIT_DEGREES,
                   max_distance: float = REVISIT_DISTANCE) -> dict:
    """Recall over a run. sessions: per session ``(chunk_poses [N, 4, 4], per-chunk recall lists)``.

    Returns ``attention_recall_mean`` (chunks past the window: index > sink_chunks + recent_chunks,
    the first whose history can exceed a sliding window), ``attention_recall_revisit_mean`` (revisit
    chunks) and their counts; means are None where no chunk qualifies.
    """
    past, revisit = [], []
    for poses, recalls in sessions:
        sources = revisit_sources(poses, sink_chunks, recent_chunks, max_degrees=max_degrees,
                                  max_distance=max_distance)
        for c, values in enumerate(recalls):
            if not values:
                continue
            m = float(np.mean(values))
            if math.isnan(m):
                continue
            if c > sink_chunks + recent_chunks:
                past.append(m)
            if sources[c]:
                revisit.append(m)
    return {
        "attention_recall_mean": _mean(past),
        "attention_recall_chunks": len(past),
        "attention_recall_revisit_mean": _mean(revisit),
        "revisit_chunks": len(revisit),
        "revisit_degrees": max_degrees,
    }
