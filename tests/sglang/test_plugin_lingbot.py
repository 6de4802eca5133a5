"""The worldkv plugin in SGLang's LingBot-World stage: a realtime session driven by actions that turn
away and come back; poses from SGLang's own action integration (``_actions_to_c2ws``)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import harness
import shims

pytestmark = pytest.mark.sglang

K = 3


def tiny_lingbot(seed=0):
    from sglang.multimodal_gen.configs.models.dits.lingbot_world import LingBotWorldArchConfig, LingBotWorldVideoConfig
    from sglang.multimodal_gen.runtime.models.dits.lingbot_world import CausalLingBotWorldTransformer3DModel

    shims.init_single_process_parallel()
    arch = LingBotWorldArchConfig(num_attention_heads=harness.H, attention_head_dim=harness.D, in_channels=harness.IN_CH,
                                  out_channels=harness.IN_CH, text_dim=harness.TEXT_DIM, freq_dim=16, ffn_dim=32,
                                  num_layers=harness.LAYERS, num_frames_per_block=harness.FPC)
    torch.manual_seed(seed)
    model = CausalLingBotWorldTransformer3DModel(LingBotWorldVideoConfig(arch_config=arch), hf_config={}).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    shims.fix_causal_wan_cross_attention(model)
    return model


class Session:
    """The bits of a realtime session ``_prepare_lingbot_world_condition`` reads."""

    def __init__(self):
        self.states = {}

    def get_or_create_state(self, cls):
        return self.states.setdefault(cls, cls())


def turn_away_and_back(chunks_out=10, chunks_back=10):
    """Per latent frame: yaw right ("l", 6 deg) for chunks_out chunks, then left back ("j")."""
    fpc = harness.FPC
    return [["l"]] * (fpc * chunks_out) + [["j"]] * (fpc * chunks_back)


def test_realtime_revisit_retrieves_first_visit_chunks(hooks, worldkv):
    from sglang.multimodal_gen.configs.pipeline_configs import lingbot_world as lbc
    from sglang.multimodal_gen.runtime.realtime.states import RealtimeCausalDiTState

    worldkv(keep_ratio=0.5, retrieval_chunks=K, hot_chunks=K, sink_frames=3, recent_frames=6,
            page_size=harness.FRAME_TOKENS)
    stage = harness.make_stage(tiny_lingbot(), sink_frames=3, window_frames=12, lingbot=True)
    run = harness.Run(stage, seed=4, num_passes=1)
    session, state = Session(), RealtimeCausalDiTState()
    state.kv_cache, state.crossattn_cache = run.kv_cache, run.crossattn_cache
    pipeline_config = SimpleNamespace(
        vae_config=SimpleNamespace(arch_config=SimpleNamespace(spatial_compression_ratio=8)),
        dit_config=SimpleNamespace(arch_config=SimpleNamespace(num_frames_per_block=harness.FPC)),
    )
    actions = turn_away_and_back()
    n_chunks = len(actions) // harness.FPC
    group, rt = run.kv_cache[0].group, None
    resident, sglang_growing = [], []
    for c in range(n_chunks):
        b = run.batch
        b.c2ws_plucker_emb, b.session, b.block_idx, b.realtime_session_id = None, session, c, "rt-0"
        b.condition_inputs = {"camera_actions": actions[c * harness.FPC:(c + 1) * harness.FPC]}
        b.realtime_chunk_size, b.width, b.height = harness.FPC, 8 * harness.LAT_W, 8 * harness.LAT_H
        emb = lbc._prepare_lingbot_world_condition(batch=b, pipeline_config=pipeline_config, device="cpu",
                                                   dtype=torch.float32)
        run.chunk(c, pos_cond={"c2ws_plucker_emb": emb})
        rt = group.runtime
        resident.append(rt.resident_kv_bytes())
        sglang_growing.append((c + 1) * rt.chunk_tokens * rt.kv_shape.token_bytes * 2 * rt.kv_shape.num_layers)
    sid = group.session.session_id
    poses = group.session.poses  # [F, 4, 4] absolute c2w from SGLang's _actions_to_c2ws
    assert poses.shape[0] == len(actions)
    np.testing.assert_allclose(poses, np.stack(lbc._actions_to_c2ws(actions)[1:]))
    # precision of retrieval against the connector's pose oracle (WorldKV score over the candidates)
    hits = total = 0
    revisits = 0
    for c, got in enumerate(group.retrieved):
        cand = list(range(1, c - 2))  # not the sink (chunk 0), not the recent window (c-2, c-1)
        if not cand:
            continue
        cp = poses.reshape(n_chunks, harness.FPC, 4, 4)
        ct, cr = cp[cand][:, :, :3, 3].mean(1), cp[cand][:, :, :3, :3].mean(1)
        qt, qr = cp[c][:, :3, 3].mean(0), cp[c][:, :3, :3].mean(0)
        trans = ((ct - qt) ** 2).sum(-1)
        rot = np.arccos(np.clip((np.einsum("nij,ij->n", cr, qr) - 1) / 2, -1, 1))
        dist = 0.5 * trans / max(trans.max(), 1e-300) + 0.5 * rot / max(rot.max(), 1e-300)
        k = min(K, len(cand))
        oracle = {cid for cid, d in zip(cand, dist) if d <= np.sort(dist)[k - 1] + 1e-12}
        hits += len(oracle.intersection(got))
        total += k
        if c >= 12 and cand[int(np.argmin(dist))] < 10:  # coming back: the best view is a first-visit chunk
            revisits += 1
            assert set(got) & set(range(10)), f"chunk {c} retrieved {got}, no first-visit chunk"
    assert revisits >= 5 and total >= 40
    assert hits / total >= 0.9, f"precision {hits / total:.3f}"
    # resident KV bounded by sink + hot set + recent + current (+ one evicted chunk awaiting its store)
    per_chunk = rt.kv_shape.page_bytes(rt.bm.page_size) * 2 * rt.kv_shape.num_layers * -(-rt.chunk_tokens // rt.bm.page_size)
    bound = (1 + K + 2 + 1 + 1) * per_chunk
    assert max(resident) <= bound and max(resident) < sglang_growing[-1] / 2
    print(f"resident KV peak {max(resident)} B (bound {bound} B); SGLang's growing cache {sglang_growing[-1]} B "
          f"after {n_chunks} chunks; retrieval precision {hits / total:.3f} over {total} picks")
    assert max(resident[10:]) == max(resident[10:14])  # flat once the window and the hot set filled
    # session end (SGLang's dispose) frees the session's bank entries
    assert rt.connector.scheduler.banked_chunks(sid)
    state.dispose()
    rt.poll()
    assert rt.connector.scheduler.banked_chunks(sid) == [] and sid not in rt.connector.scheduler.sessions()
