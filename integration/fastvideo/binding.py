"""``WorldKVBinding``: WorldKV installed on one FastVideo transformer.

It replaces the dense rolling cache FastVideo's stage would allocate by *window dicts* of the same
layout, one per layer (``{"k", "v": [1, capacity, H, D], "global_end_index", "local_end_index"}``,
capacity = the WorldKV window ``sink | retrieved | recent | current``), and hooks

- the transformer's ``forward``: a call at a new chunk start plans the chunk (retrieval by the
  chunk's pose, loads); a call at the clean-pass timestep (``context_noise``) commits it;
- every self-attention copy's ``forward``: before the first pass of a chunk the layer's dict is
  filled with ``sink | retrieved | recent`` from the paged pool and its indices set so FastVideo's
  own code appends the current chunk after them and attends to all of it (FastVideo's attention
  backend, FastVideo's RoPE); after the clean pass the chunk's K/V leave the dict for its pages
  and the connector's write-through store;
- Matrix-Game-2's action module caches (keyboard ``[1, frames, h, d]``, mouse
  ``[frame_tokens, frames, h, d]``): filled with the same chunks' action K/V in the same order, so
  what the action module attends to is what self-attention retrieved. The action K/V of every
  committed chunk is kept beside the bank (host memory) until the bank drops the chunk.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from worldkv_connector.integration.fastvideo.config import FastVideoWorldKVConfig
from worldkv_connector.integration.fastvideo.host import WorldKVHost
from worldkv_connector.integration.fastvideo.models import CallInfo, ModelSpec
from worldkv_connector.integration.fastvideo.poses import matrixgame2_latent_poses
from worldkv_connector.shapes import KVShape

__all__ = ["WorldKVBinding", "MARK"]

logger = logging.getLogger(__name__)

MARK = "_worldkv_layer"  # key of a window dict: the layer index (its binding is found by identity)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class WorldKVBinding:
    def __init__(self, transformer, spec: ModelSpec, config: FastVideoWorldKVConfig):
        self.transformer = transformer
        self.spec = spec
        self.config = config
        self.fpc = config.frames_per_chunk
        self.capacity_frames = config.window_chunks * self.fpc
        self.host: WorldKVHost | None = None
        self.caches: list[dict] = []
        self.kb_caches: list[dict] | None = None
        self.ms_caches: list[dict] | None = None
        self.latent_poses: np.ndarray | None = None  # [N, 4, 4] given poses (LingBot, or a user's)
        self.action_bank: dict[int, list] = {}  # chunk id -> per layer (kb_k, kb_v, ms_k, ms_v) or None
        self._seen_banked: set[int] = set()
        self._dtype = torch.float32
        self._device = torch.device("cpu")
        self._chunk: int | None = None
        self._clean = False
        self._win: dict[int, int] = {}  # layer -> W tokens staged this chunk
        self._win_frames: dict[int, int] = {}  # layer -> action frames staged this chunk
        self._current_start = 0
        self._saved_attrs: dict | None = None
        self._orig: dict = {}
        self.sessions_started = 0

    # --- install ---------------------------------------------------------------------------------
    def install(self) -> None:
        tr = self.transformer
        self._saved_attrs = self.spec.open_window(tr, self.capacity_frames)
        self._orig["forward"] = tr.forward
        tr.forward = self._transformer_forward
        for i, m in enumerate(self.spec.attention_modules(tr)):
            self._orig[("attn", i)] = m.forward
            m.forward = self._attn_forward(i, m.forward)

    def uninstall(self) -> None:
        self.end_session()
        tr = self.transformer
        if "forward" in self._orig:
            tr.forward = self._orig.pop("forward")
        for i, m in enumerate(self.spec.attention_modules(tr)):
            if ("attn", i) in self._orig:
                m.forward = self._orig.pop(("attn", i))
        if self._saved_attrs is not None:
            self.spec.restore_window(tr, self._saved_attrs)
            self._saved_attrs = None
        if self.host is not None:
            self.host.close()
            self.host = None

    # --- caches the stage asks for ------------------------------------------------------------------
    def new_caches(self, batch_size: int, dtype: torch.dtype, device) -> list[dict]:
        """The stage's ``_initialize_kv_cache``: a new world (session). Buffers are sized at the
        first transformer call, when the tokens per frame are known."""
        if batch_size != 1:
            raise ValueError(f"worldkv: batch_size={batch_size}; the FastVideo adapter runs one world per "
                             "pipeline call (batch size 1)")
        if dtype not in _DTYPES:
            raise TypeError(f"worldkv: cache dtype {dtype}: expected one of {list(_DTYPES)}")
        self.end_session()
        # the window is in the model's dtype (FastVideo's stages ask for bf16 whatever the model)
        param = next(self.transformer.parameters(), None)
        self._dtype = param.dtype if param is not None and param.dtype in _DTYPES else dtype
        self._device = param.device if param is not None else torch.device(device)
        self.caches = [{MARK: i} for i in range(len(self.transformer.blocks))]
        self.kb_caches = self.ms_caches = None
        self.sessions_started += 1
        return self.caches

    def new_action_caches(self) -> tuple[list[dict], list[dict]]:
        """Matrix-Game-2's ``_initialize_action_kv_cache`` (mouse, keyboard)."""
        n = len(self.transformer.blocks)
        self.ms_caches = [{MARK: i} for i in range(n)]
        self.kb_caches = [{MARK: i} for i in range(n)]
        return self.ms_caches, self.kb_caches

    def set_latent_poses(self, poses) -> None:
        """[N, 4, 4] camera-to-world per latent frame of the coming session(s)."""
        arr = np.asarray(poses, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[1:] != (4, 4) or len(arr) == 0 or not np.isfinite(arr).all():
            raise ValueError(f"poses: expected finite [N, 4, 4] camera-to-world per latent frame, got {arr.shape}")
        self.latent_poses = arr

    def _allocate(self, frame_tokens: int) -> None:
        heads, head_dim = self.spec.kv_dims(self.transformer)
        shape = KVShape(f"fastvideo-{self.spec.kind}", len(self.transformer.blocks), heads, head_dim, frame_tokens,
                        _DTYPES[self._dtype], self.fpc)
        if self.host is None or self.host.kv_shape != shape:
            if self.host is not None:
                self.host.close()
            self.host = WorldKVHost(self.config, shape, self._device)
        cap = self.capacity_frames * frame_tokens

        def dense(d: dict, rows: int, length: int, h: int, dim: int) -> None:
            d["k"] = torch.zeros(rows, length, h, dim, dtype=self._dtype, device=self._device)
            d["v"] = torch.zeros_like(d["k"])
            d["global_end_index"] = torch.tensor([0], dtype=torch.long, device=self._device)
            d["local_end_index"] = torch.tensor([0], dtype=torch.long, device=self._device)

        for d in self.caches:
            dense(d, 1, cap, heads, head_dim)
        if self.spec.has_actions and self.kb_caches is not None:
            ac = self.transformer.action_config
            ah = ac.get("heads_num", 16)
            for i in range(len(self.caches)):
                dense(self.kb_caches[i], 1, self.capacity_frames, ah, ac.get("keyboard_hidden_dim", 1024) // ah)
                dense(self.ms_caches[i], frame_tokens, self.capacity_frames, ah, ac.get("mouse_hidden_dim", 1024) // ah)
        self.host.start_session()
        self.action_bank = {}
        self._seen_banked = set()

    # --- transformer call -------------------------------------------------------------------------
    def _transformer_forward(self, *args, **kwargs):
        kv = kwargs.get("kv_cache")
        if not (isinstance(kv, list) and kv and isinstance(kv[0], dict) and kv[0] is (self.caches[0] if self.caches
                                                                                      else None)):
            return self._orig["forward"](*args, **kwargs)  # not a WorldKV cache (e.g. training path)
        info = self.spec.call_info(self.transformer, args, kwargs)
        self._before_pass(info, kwargs)
        if self.spec.kind == "lingbot2":
            kwargs["max_attention_size"] = self.capacity_frames * info.frame_tokens  # the whole window dict
        out = self._orig["forward"](*args, **kwargs)
        if self._clean:
            self._after_clean_pass()
        return out

    def _before_pass(self, info: CallInfo, kwargs: dict) -> None:
        if info.num_frames != self.fpc:
            raise ValueError(f"worldkv: a transformer call over {info.num_frames} latent frames; the WorldKV window "
                             f"works in chunks of {self.fpc} (an image-conditioned first frame or a MoE boundary "
                             "block is not supported)")
        chunk_tokens = self.fpc * info.frame_tokens
        if info.current_start % chunk_tokens:
            raise ValueError(f"worldkv: current_start={info.current_start} is not a chunk boundary "
                             f"({chunk_tokens} tokens per chunk)")
        chunk = info.current_start // chunk_tokens
        if self.host is None or "k" not in self.caches[0]:
            self._allocate(info.frame_tokens)
        elif self.host.kv_shape.frame_tokens != info.frame_tokens:
            raise ValueError(f"worldkv: {info.frame_tokens} tokens per frame in a session that started with "
                             f"{self.host.kv_shape.frame_tokens}")
        if self._chunk is None:
            expect = self.host.next_chunk
            if chunk != expect:
                raise ValueError(f"worldkv: chunk {chunk} requested, the session's next chunk is {expect} "
                                 "(chunks run in order, each ending with its clean pass)")
            self.host.begin_chunk(self._chunk_poses(chunk, kwargs))
            self._chunk, self._win, self._win_frames = chunk, {}, {}
        elif chunk != self._chunk:
            raise ValueError(f"worldkv: chunk {chunk} started before chunk {self._chunk}'s clean pass "
                             f"(timestep {self.config.context_noise})")
        self._current_start = info.current_start
        t = info.timestep.float()
        self._clean = bool(torch.all(t == float(self.config.context_noise)))

    def _chunk_poses(self, chunk: int, kwargs: dict) -> np.ndarray:
        lo = chunk * self.fpc
        if self.spec.has_actions and kwargs.get("keyboard_cond") is not None and kwargs.get("mouse_cond") is not None:
            poses = matrixgame2_latent_poses(kwargs["keyboard_cond"], kwargs["mouse_cond"], lo + self.fpc,
                                             yaw_speed=self.config.yaw_speed, pitch_speed=self.config.pitch_speed,
                                             move_speed=self.config.move_speed)
            return poses[lo:lo + self.fpc]
        if self.latent_poses is not None:
            idx = np.minimum(np.arange(lo, lo + self.fpc), len(self.latent_poses) - 1)  # past the end: hold the last
            return self.latent_poses[idx]
        return np.repeat(np.eye(4)[None], self.fpc, axis=0)  # no camera: every chunk at the identity

    # --- one attention copy ---------------------------------------------------------------------------
    def _attn_forward(self, layer: int, orig):
        def forward(*args, **kwargs):
            d = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, dict) and MARK in a), None)
            if d is None:
                return orig(*args, **kwargs)
            if d is not self.caches[layer]:
                raise RuntimeError(f"worldkv: layer {layer} got the window dict of layer {d[MARK]}")
            if layer not in self._win:
                with torch.no_grad():  # cache bookkeeping is never part of a graph
                    w, ids = self.host.layer_window(layer, d["k"], d["v"])
                    d["local_end_index"].fill_(w)
                    d["global_end_index"].fill_(self._current_start)
                    self._win[layer] = w
                    if self.spec.has_actions and self.kb_caches is not None:
                        self._stage_actions(layer, ids)
            out = orig(*args, **kwargs)
            if self._clean:
                w, n = self._win[layer], self.host.chunk_tokens
                with torch.no_grad():
                    self.host.commit_layer(layer, d["k"][:, w:w + n].detach(), d["v"][:, w:w + n].detach())
            return out

        return forward

    def _stage_actions(self, layer: int, ids: list[int]) -> None:
        kb, ms = self.kb_caches[layer], self.ms_caches[layer]
        pos = 0
        for cid in ids:
            entry = self.action_bank.get(cid)
            rec = entry[layer] if entry is not None else None
            if rec is None:
                logger.warning("worldkv: no action K/V for chunk %d (layer %d); the action window skips it", cid, layer)
                continue
            for d, k, v in ((kb, rec[0], rec[1]), (ms, rec[2], rec[3])):
                d["k"][:, pos:pos + self.fpc] = k.to(d["k"].device)
                d["v"][:, pos:pos + self.fpc] = v.to(d["v"].device)
            pos += self.fpc
        start_frame = self._current_start // (self.host.chunk_tokens // self.fpc)
        for d in (kb, ms):
            d["local_end_index"].fill_(pos)
            d["global_end_index"].fill_(start_frame)
        self._win_frames[layer] = pos

    def _after_clean_pass(self) -> None:
        chunk = self._chunk
        if self.spec.has_actions and self.kb_caches is not None:
            rows = []
            for layer in range(len(self.caches)):
                f = self._win_frames.get(layer)
                if f is None:
                    rows.append(None)
                    continue
                kb, ms = self.kb_caches[layer], self.ms_caches[layer]
                rows.append(tuple(d[x][:, f:f + self.fpc].detach().to("cpu", copy=True) for d in (kb, ms)
                                  for x in ("k", "v")))
            self.action_bank[chunk] = rows
        self.host.end_chunk()
        self._chunk, self._clean = None, False
        self._prune_action_bank()

    def _prune_action_bank(self) -> None:
        if not self.action_bank:
            return
        host = self.host
        sid = host.session_id
        s = host.session
        live = set(host.connector.scheduler.banked_chunks(sid)) | set(host.connector.scheduler.resident_chunks(sid))
        self._seen_banked |= live
        keep = live | set(s.sink) | set(s.recent)
        for cid in list(self.action_bank):
            if cid in self._seen_banked and cid not in keep:
                del self.action_bank[cid]  # the bank dropped the chunk: its action K/V go too

    # --- session end ----------------------------------------------------------------------------------
    def end_session(self) -> None:
        """Free the session's pages, bank entries and action K/V."""
        if self.host is not None and self.host.session_id is not None:
            self.host.end_session()
        self._chunk, self._clean = None, False
        self.action_bank = {}
        self._seen_banked = set()

    def action_bank_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for rows in self.action_bank.values() for rec in rows if rec
                   for t in rec)

    def window_bytes(self) -> int:
        """Bytes of the window dicts (self-attention and action caches) on the model's device."""
        total = 0
        for group in (self.caches, self.kb_caches or [], self.ms_caches or []):
            for d in group:
                for key in ("k", "v"):
                    if key in d:
                        total += d[key].numel() * d[key].element_size()
        return total

    def metrics(self) -> dict:
        out = self.host.metrics() if self.host is not None else {}
        out.update(window_bytes=self.window_bytes(), action_bank_bytes=self.action_bank_bytes(),
                   action_bank_chunks=len(self.action_bank), sessions_started=self.sessions_started)
        return out
