"""``reference-style`` mode of ``worldkv bench e2e``: the WorldKV reference implementation's data path.

The same retrieval choice as the ``worldkv`` connector (a ``PoseIndex`` with the config's policy,
``retrieval_chunks`` per step, sink and recent chunks never candidates, retrieved chunks in
ascending chunk order, a chunk a candidate from the step after its clean pass) and the same
compression (``compress_chunk`` with the config's ``keep_ratio``/``pooled``), but the data path of
the reference scripts (DESIGN §2):

- the bank is a per-session dict of per-layer Python lists of CPU tensors (pageable memory);
- at every chunk step, for every layer, the retrieved chunks are copied to the device with a
  synchronous ``.to()`` and ``torch.cat``-ed with the sink and recent K/V into a dense window;
- every attention call concatenates the current chunk onto that window and runs dense attention
  (no pages, no block table).

It is an attention variant (``ReferenceStyleAttention``) that the bench swaps into the engine's
model runner (:func:`attach`), so the engine's hot path carries no benchmark branches. The engine's
paged cache still holds the sink, recent and current chunks (the reference keeps those in a dense
cache; here they are gathered from pages once per step and layer). Attention recall
(``--eval-attention-recall``) does not see this mode's retrieved chunks: it is a speed baseline.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from worldkv_connector.compression import compress_chunk
from worldkv_connector.config import WorldKVConfig
from worldkv_connector.retrieval import PoseIndex
from worldkv_connector.integration.video.attention import PagedAttention, WindowPlan, write_current_kv
from worldkv_connector.rope import rotate_temporal

__all__ = ["ReferenceStyleAttention", "attach", "overrides"]

logger = logging.getLogger(__name__)


class ReferenceStyleAttention:
    """Drop-in for the model runner's ``PagedAttention`` (``begin_step``/``set_pass``/``end_step``/
    ``__call__``) with the reference's dense data path.

    paged: the engine's PagedAttention (its KV pools hold sink, recent and current pages);
    config: the WorldKV config (retrieval, compression, window); frame_tokens, frames_per_chunk,
    num_layers: the model's sizes.
    """

    def __init__(self, paged: PagedAttention, config: WorldKVConfig, *, frame_tokens: int, frames_per_chunk: int,
                 num_layers: int) -> None:
        self.paged = paged
        self.config = config
        self.frame_tokens = frame_tokens
        self.fpc = frames_per_chunk
        self.num_layers = num_layers
        self.index = PoseIndex.from_config(config)
        # session -> chunk id -> per layer (k, v) [T', H, D] on the CPU (the reference's Python lists)
        self.bank: dict[str, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.connector = None  # the runner reads it; this mode has no connector
        self._retrieved: dict[tuple[str, int], list[int]] = {}
        self._window: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # row -> layer -> (k, v) dense window
        self.window_bytes = 0  # device bytes of this step's dense windows (sink + retrieved + recent)

    # --- the runner's interface ---------------------------------------------------------------
    @property
    def plan(self) -> WindowPlan | None:
        return self.paged.plan

    @property
    def metadata(self):
        return self.paged.metadata

    def _excluded(self, chunk: int) -> list[int]:
        sink = min(self.config.sink_chunks, chunk)
        recent_start = max(self.config.sink_chunks, chunk - self.config.recent_chunks)
        return list(range(sink)) + list(range(recent_start, chunk))

    def _pages(self, kv: torch.Tensor, segments) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K, V [N, H, D] of the given segments' valid tokens, read from the pool kv."""
        ks, vs = [], []
        for s in segments:
            pages = torch.tensor(s.page_ids, dtype=torch.long, device=kv.device)
            n = s.num_tokens
            ks.append(kv[0][pages].flatten(0, 1)[:n])  # pages of a whole chunk: only the last is partial
            vs.append(kv[1][pages].flatten(0, 1)[:n])
        return ks, vs

    def begin_step(self, plan: WindowPlan, device: torch.device):
        meta = self.paged.begin_step(plan, device)
        cfg, k_ret = self.config, self.config.retrieval_chunks
        self._window, self.window_bytes = [], 0
        for row, segments in enumerate(plan.rows):
            sid, cc = plan.session_ids[row], plan.committed[row]
            chunk = cc.chunk_id
            chosen = sorted(self.index.query(sid, cc.frame_poses, k_ret, self._excluded(chunk))) if k_ret else []
            self._retrieved[(sid, chunk)] = chosen
            recent_start = max(cfg.sink_chunks, chunk - cfg.recent_chunks) * self.fpc
            sink = [s for s in segments if s.kind == "sink"]
            recent = [s for s in segments if s.kind == "recent"]
            layers = []
            for layer in range(self.num_layers):
                kv = self.paged.kv_caches[f"blocks.{layer}"]
                sk, sv = self._pages(kv, sink)
                rk, rv = self._pages(kv, recent)
                ek, ev = [], []
                for j, cid in enumerate(chosen):
                    k_cpu, v_cpu = self.bank[sid][cid][layer]
                    k_dev, v_dev = k_cpu.to(device), v_cpu.to(device)  # synchronous copy from pageable memory
                    if cfg.rope_correction:  # sit contiguously just before the recent window
                        k_dev = rotate_temporal(k_dev, recent_start - (len(chosen) - j) * self.fpc - cid * self.fpc)
                    ek.append(k_dev)
                    ev.append(v_dev)
                wk = wv = None  # the first chunk of a session has no window before it
                if sk + ek + rk:
                    wk, wv = torch.cat(sk + ek + rk), torch.cat(sv + ev + rv)  # [sink | retrieved | recent]
                    self.window_bytes += 2 * wk.numel() * wk.element_size()
                layers.append((wk, wv))
            self._window.append(layers)
        return meta

    def set_pass(self, timestep: torch.Tensor, clean: bool) -> None:
        self.paged.set_pass(timestep, clean)

    def end_step(self) -> None:
        plan = self.paged.plan
        if plan is not None:
            for sid, cc in zip(plan.session_ids, plan.committed):
                if len(self.bank.get(sid, {}).get(cc.chunk_id, ())) == self.num_layers:
                    self.index.add(sid, cc.chunk_id, cc.frame_poses)  # a candidate from the next step on
        self._window = []
        self.paged.end_step()

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, T, H, D] post-RoPE, model dtype and device. Returns [B, T, H, D]."""
        meta = self.paged.metadata
        if meta is None:
            raise RuntimeError("ReferenceStyleAttention called outside a step (begin_step was not called)")
        # the pages keep the current chunk for the sink / recent windows of later steps
        write_current_kv(self.paged.kv_caches[f"blocks.{layer_idx}"], k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        for row in range(q.shape[0]):
            wk, wv = self._window[row][layer_idx]
            kk = k[row] if wk is None else torch.cat([wk.to(k.dtype), k[row]])  # [N, H, D]: the reference's cat
            vv = v[row] if wv is None else torch.cat([wv.to(v.dtype), v[row]])
            if kk.shape[1] != q.shape[2]:  # GQA
                rep = q.shape[2] // kk.shape[1]
                kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q[row].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1))
            out[row] = o.transpose(0, 1)
        if meta.is_clean_pass:
            self._bank_layer(layer_idx, k, v)
        return out

    def _bank_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Compress each row's committed chunk of this layer and keep it in CPU (pageable) memory."""
        plan = self.paged.plan
        for row, (sid, cc) in enumerate(zip(plan.session_ids, plan.committed)):
            comp = compress_chunk(k[row], v[row], frame_tokens=self.frame_tokens, keep_ratio=self.config.keep_ratio,
                                  pooled=self.config.pooled)
            layers = self.bank.setdefault(sid, {}).setdefault(cc.chunk_id, [])
            if len(layers) != layer:
                raise RuntimeError(f"reference-style bank: layer {layer} of chunk {cc.chunk_id} out of order")
            layers.append((comp.k.cpu(), comp.v.cpu()))

    # --- bench hooks ------------------------------------------------------------------------------
    def retrieved(self, session_id: str, chunk_id: int) -> list[int]:
        """Chunk ids this mode put in the window of ``chunk_id`` (ascending)."""
        return list(self._retrieved.get((session_id, chunk_id), []))

    def extra_resident_bytes(self) -> int:
        """Device bytes of the last step's dense windows (outside the engine's pages)."""
        return self.window_bytes

    def bank_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.bank.values() for layers in s.values()
                   for kv in layers for t in kv)


def _config(options: dict) -> WorldKVConfig:
    return WorldKVConfig.from_json(options.get("kv_connector_config"))


def overrides(options: dict) -> dict:
    """EngineArgs of the mode: a sliding window equal to the WorldKV config's, no connector."""
    cfg = _config(options)
    return {"attention_window": "sliding", "sink_frames": cfg.sink_frames, "recent_frames": cfg.recent_frames}


def attach(engine, options: dict) -> ReferenceStyleAttention:
    """Swap the reference data path into ``engine``'s model runner; returns it (bench hooks)."""
    cfg = _config(options)
    mc = engine.model_config
    if engine.runner.recall is not None:
        logger.warning("reference-style: attention recall does not see this mode's retrieved chunks")
    attn = ReferenceStyleAttention(engine.runner.attention, cfg, frame_tokens=mc.frame_tokens,
                                   frames_per_chunk=mc.frames_per_chunk, num_layers=mc.num_layers)
    engine.runner.attention = attn
    return attn
