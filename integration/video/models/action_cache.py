"""The action caches of Matrix-Game-2, kept beside the paged self-attention KV.

Upstream keeps, per action block, a mouse cache (keys/values per spatial token and latent frame) and a
keyboard cache (one key/value per latent frame) next to the self-attention cache, and the window of
all three is the same frames. Here every committed chunk's action K/V is stored per (session, chunk)
and the action attention of a step reads **the chunks of that row's self-attention window**, in
window order ``[sink | external | recent | current]``, taken from the step's WindowPlan at call time.
So a chunk the connector retrieves (an ``external`` segment) brings its action K/V back with it, a
chunk dropped from the window for a failed load is dropped here too, and evicted chunks simply stop
being read. The current chunk's entry is rewritten on every pass; the clean pass leaves the committed one.

Memory: one chunk's action K/V is ``layers_with_actions * 2 * (S * F * mouse_hidden + F * keyboard_hidden)``
elements (Matrix-Game-2 in bf16: about 155 MiB per chunk), on the model's device, freed when the
session ends. A window chunk without an entry (e.g. one resumed from a saved bank, which holds only
the self-attention KV) is left out of the action attention and counted in ``missing``, logged once.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["ActionKVStore"]

logger = logging.getLogger(__name__)

_KINDS = ("mouse", "keyboard")


class ActionKVStore:
    """``action_attn(layer_idx, kind, q, k, v)`` over the action K/V of each row's window chunks."""

    def __init__(self) -> None:
        self._kv: dict[tuple[str, int], dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.plan = None
        self.missing = 0  # window chunks read without an action entry (over the run)
        self._warned = False

    def begin_step(self, plan) -> None:
        """plan: the step's WindowPlan (rows of segments; drop_external edits it in place)."""
        self.plan = plan

    def end_step(self) -> None:
        self.plan = None

    def end_session(self, session_id: str) -> None:
        for key in [k for k in self._kv if k[0] == session_id]:
            del self._kv[key]

    @property
    def num_chunks(self) -> int:
        return len(self._kv)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self._kv.values() for kv in e.values() for t in kv)

    def has(self, session_id: str, chunk_id: int) -> bool:
        return (session_id, chunk_id) in self._kv

    def __call__(self, layer_idx: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """mouse: q, k, v [B*S, F, H, D]; keyboard: q [B*S, F, H, D], k, v [B, F, H, D]. Returns [B*S, F, H, D]."""
        if self.plan is None:
            raise RuntimeError("ActionKVStore called outside a step (begin_step was not called)")
        if kind not in _KINDS:
            raise ValueError(f"action attention kind {kind!r}: expected one of {list(_KINDS)}")
        rows = self.plan.rows
        b = len(rows)
        s = q.shape[0] // b
        outs = []
        for r, segments in enumerate(rows):
            sid = self.plan.session_ids[r]
            cur = segments[-1].chunk_id
            lo, hi = (r * s, (r + 1) * s) if kind == "mouse" else (r, r + 1)
            self._kv.setdefault((sid, cur), {})[(layer_idx, kind)] = (k[lo:hi].detach().clone(), v[lo:hi].detach().clone())
            ks, vs = [], []
            for seg in segments:
                entry = self._kv.get((sid, seg.chunk_id), {}).get((layer_idx, kind))
                if entry is None:
                    self._missing(sid, seg.chunk_id)
                    continue
                ks.append(entry[0])
                vs.append(entry[1])
            kk = torch.cat(ks, dim=1).to(q.device, q.dtype)  # [S or 1, window frames, H, D]
            vv = torch.cat(vs, dim=1).to(q.device, q.dtype)
            if kind == "keyboard":
                kk, vv = kk.expand(s, -1, -1, -1), vv.expand(s, -1, -1, -1)
            qr = q[r * s:(r + 1) * s]
            out = F.scaled_dot_product_attention(qr.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
            outs.append(out.transpose(1, 2))
        return torch.cat(outs, dim=0)

    def _missing(self, session_id: str, chunk_id: int) -> None:
        self.missing += 1
        if not self._warned:
            logger.warning("no action K/V for chunk (%r, %d) in the window: its action attention leaves it out "
                           "(later ones are counted in missing)", session_id, chunk_id)
            self._warned = True
