"""Safetensors checkpoints in Wan's original key layout: round trip, hand-written Wan keys, shards,
prefixes, dtype casts and one clear error for every mismatch."""
import pytest
import torch
from safetensors.torch import save_file

from worldkv_connector.integration.video.checkpoint import load_checkpoint, save_checkpoint
from worldkv_connector.integration.video.models import build_model
from worldkv_connector.integration.video.model_config import get_model_config

TINY = get_model_config("tiny")


def _wan_keys_and_shapes(cfg):
    """The Wan2.1 checkpoint layout, written out by hand (not read from our model)."""
    d, f, pe = cfg.dim, cfg.ffn_dim, cfg.patch_elems
    shapes = {
        "patch_embedding.weight": (d, cfg.in_channels, *cfg.patch_size),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (pe * cfg.out_channels, d), "head.head.bias": (pe * cfg.out_channels,),
        "head.modulation": (1, 2, d),
    }
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{p}{attn}.{proj}.weight"] = (d, d)
                shapes[f"{p}{attn}.{proj}.bias"] = (d,)
            shapes[f"{p}{attn}.norm_q.weight"] = (d,)
            shapes[f"{p}{attn}.norm_k.weight"] = (d,)
        shapes[p + "norm3.weight"] = (d,)
        shapes[p + "norm3.bias"] = (d,)
        shapes[p + "ffn.0.weight"], shapes[p + "ffn.0.bias"] = (f, d), (f,)
        shapes[p + "ffn.2.weight"], shapes[p + "ffn.2.bias"] = (d, f), (d,)
        shapes[p + "modulation"] = (1, 6, d)
    return shapes


def _dense_attn(layer, q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)


def _run(model, cfg=TINY):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=g)
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.8]), ctx, torch.tensor([0, 3]), _dense_attn)


def test_model_keys_are_wan_layout():
    cfg = TINY
    sd = build_model(cfg).state_dict()
    want = _wan_keys_and_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


def test_round_trip(tmp_path):
    src, dst = build_model(TINY, seed=0), build_model(TINY, seed=1)
    assert not torch.equal(_run(src), _run(dst))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(src, path)
    assert load_checkpoint(dst, path) is dst
    assert torch.equal(_run(src), _run(dst))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_hand_written_wan_checkpoint_sharded_and_cast(tmp_path):
    """A checkpoint written by hand with Wan key names, split over two shards, loads into a bf16 model."""
    g = torch.Generator().manual_seed(5)
    tensors = {k: torch.randn(s, generator=g) * 0.1 for k, s in _wan_keys_and_shapes(TINY).items()}
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[::2]}, str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in keys[1::2]}, str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    model = build_model(TINY.replace(dtype="bf16"))
    load_checkpoint(model, tmp_path)
    sd = model.state_dict()
    assert sd["blocks.1.self_attn.norm_k.weight"].dtype == torch.bfloat16
    for k, v in tensors.items():
        torch.testing.assert_close(sd[k].float(), v, atol=1e-3, rtol=1e-2)
    fp32 = build_model(TINY, seed=9)
    load_checkpoint(fp32, tmp_path)
    fp32_sd = fp32.state_dict()
    for k, v in tensors.items():
        assert torch.equal(fp32_sd[k], v), k


def test_prefix_is_stripped(tmp_path):
    src = build_model(TINY, seed=2)
    save_file({"model." + k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = build_model(TINY, seed=3)
    load_checkpoint(dst, tmp_path / "w.safetensors", prefix="model.")
    assert torch.equal(_run(src), _run(dst))
    with pytest.raises(ValueError, match="unexpected"):
        load_checkpoint(dst, tmp_path / "w.safetensors")


def test_every_mismatch_is_listed_in_one_error(tmp_path):
    sd = {k: v.clone() for k, v in build_model(TINY, seed=2).state_dict().items()}
    del sd["blocks.0.ffn.2.bias"]
    del sd["head.modulation"]
    sd["blocks.9.self_attn.q.weight"] = torch.zeros(2, 2)
    sd["pos_embedding"] = torch.zeros(3)
    sd["blocks.1.self_attn.q.weight"] = torch.zeros(TINY.dim, TINY.dim + 1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    model = build_model(TINY, seed=4)
    before = _run(model)
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    for needle in (
        "2 missing", "blocks.0.ffn.2.bias", "head.modulation",
        "2 unexpected", "blocks.9.self_attn.q.weight", "pos_embedding",
        "1 mis-shaped", f"blocks.1.self_attn.q.weight ({TINY.dim}, {TINY.dim + 1})",
    ):
        assert needle in msg, (needle, msg)
    assert torch.equal(_run(model), before)  # nothing was copied


def test_matrix_game2_and_lingbot_keys_follow_upstream(tmp_path):
    """The upstream key names of the two world models, written out by hand (Matrix-Game-2: img_emb and
    blocks.{i}.action_model in the action blocks, no text_embedding; LingBot-World: the camera layers)."""
    mg = get_model_config("tiny-mg2")
    sd = {k: tuple(v.shape) for k, v in build_model(mg).state_dict().items()}
    a, d = mg.action, mg.dim
    want = {
        "patch_embedding.weight": (d, 36, 1, 2, 2), "img_emb.proj.0.weight": (mg.image_dim,),
        "img_emb.proj.1.weight": (mg.image_dim, mg.image_dim), "img_emb.proj.3.weight": (d, mg.image_dim),
        "img_emb.proj.4.bias": (d,),
        "blocks.0.action_model.keyboard_embed.0.weight": (a.hidden_size, 4),
        "blocks.0.action_model.mouse_mlp.0.weight": (a.mouse_hidden_dim, 2 * 12 + d),
        "blocks.0.action_model.mouse_mlp.3.bias": (a.mouse_hidden_dim,),
        "blocks.1.action_model.t_qkv.weight": (3 * a.mouse_hidden_dim, a.mouse_hidden_dim),
        "blocks.1.action_model.img_attn_q_norm.weight": (a.mouse_hidden_dim // a.heads_num,),
        "blocks.1.action_model.proj_mouse.weight": (d, a.mouse_hidden_dim),
        "blocks.1.action_model.mouse_attn_q.weight": (a.keyboard_hidden_dim, d),
        "blocks.1.action_model.keyboard_attn_kv.weight": (2 * a.keyboard_hidden_dim, a.hidden_size * 12),
        "blocks.1.action_model.proj_keyboard.weight": (d, a.keyboard_hidden_dim),
        "blocks.1.cross_attn.k.weight": (d, d),
    }
    for k, shape in want.items():
        assert sd.get(k) == shape, k
    assert not any(k.startswith("text_embedding") for k in sd) and not any("cam_" in k for k in sd)
    assert "blocks.1.action_model.t_qkv.bias" not in sd  # qkv_bias False upstream
    lb = get_model_config("tiny-lingbot")
    sd = {k: tuple(v.shape) for k, v in build_model(lb).state_dict().items()}
    d = lb.dim
    for k, shape in {"patch_embedding_wancamctrl.weight": (d, 6 * 64 * 4), "c2ws_hidden_states_layer1.weight": (d, d),
                     "c2ws_hidden_states_layer2.bias": (d,), "blocks.1.cam_injector_layer1.weight": (d, d),
                     "blocks.1.cam_injector_layer2.bias": (d,), "blocks.0.cam_scale_layer.weight": (d, d),
                     "blocks.0.cam_shift_layer.bias": (d,), "text_embedding.0.weight": (d, lb.text_dim),
                     "patch_embedding.weight": (d, 36, 1, 2, 2)}.items():
        assert sd.get(k) == shape, k
    assert not any("cam_injector." in k for k in sd)  # the project's old invented module is gone
    # a plain Wan checkpoint into Matrix-Game-2: one error naming the missing action keys
    path = tmp_path / "plain.safetensors"
    save_checkpoint(build_model(TINY), path)
    with pytest.raises(ValueError, match=r"missing: .*action_model") as err:
        load_checkpoint(build_model(mg), path)
    assert "unexpected" in str(err.value) and "text_embedding" in str(err.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(build_model(TINY), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_checkpoint(build_model(TINY), tmp_path)


# --- .pt state dicts, nested entries, prefixes, the diffusers layout, bad files --------------------------

def _self_forcing_pt(path, model):
    """A Self-Forcing-style training checkpoint: weights under generator / generator_ema, keys prefixed model."""
    sd = {"model." + k: v.clone() for k, v in model.state_dict().items()}
    noise = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"generator": noise, "generator_ema": sd, "step": torch.tensor(1000)}, str(path))


def test_self_forcing_pt_with_generator_ema_and_model_prefix(tmp_path):
    src = build_model(TINY, seed=11)
    path = tmp_path / "self_forcing_dmd.pt"
    _self_forcing_pt(path, src)
    dst = build_model(TINY, seed=12)
    load_checkpoint(dst, path, key="generator_ema", prefix="model.")
    assert torch.equal(_run(src), _run(dst))
    with pytest.raises(ValueError, match=r"--checkpoint-key.*entries: \['generator', 'generator_ema', 'step'\]"):
        load_checkpoint(dst, path)  # two state dicts: the user must choose
    with pytest.raises(ValueError, match=r"no entry 'ema' .*generator_ema"):
        load_checkpoint(dst, path, key="ema")
    with pytest.raises(ValueError, match=r"try --checkpoint-prefix model\."):
        load_checkpoint(dst, path, key="generator_ema")
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {k: v.clone() for k, v in src.state_dict().items()}}, str(plain))
    other = build_model(TINY, seed=13)
    load_checkpoint(other, plain)  # the only state dict in the file is taken
    assert torch.equal(_run(src), _run(other))


def test_diffusers_layout_is_converted_on_load(tmp_path):
    from worldkv_connector.integration.video.checkpoint_layouts import detect_layout, to_wan_key

    src = build_model(TINY, seed=14)
    wan_sd = src.state_dict()
    # the diffusers names, written by hand (diffusers' WanTransformer3DModel; its norm2 is Wan's norm3)
    names = {"time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
             "time_projection.1.bias": "condition_embedder.time_proj.bias",
             "text_embedding.2.weight": "condition_embedder.text_embedder.linear_2.weight",
             "blocks.1.self_attn.o.weight": "blocks.1.attn1.to_out.0.weight",
             "blocks.0.cross_attn.norm_k.weight": "blocks.0.attn2.norm_k.weight",
             "blocks.0.norm3.bias": "blocks.0.norm2.bias", "blocks.1.ffn.0.weight": "blocks.1.ffn.net.0.proj.weight",
             "blocks.0.modulation": "blocks.0.scale_shift_table", "head.modulation": "scale_shift_table",
             "head.head.weight": "proj_out.weight"}
    for wan, diff in names.items():
        assert to_wan_key(diff, "diffusers") == wan
    reverse = {}
    for k in wan_sd:
        d = names.get(k) or next((dk for dk in _diffusers_names(k)), None)
        reverse[d] = wan_sd[k].clone()
    assert detect_layout(reverse) == "diffusers"
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(reverse, str(path))
    dst = build_model(TINY, seed=15)
    load_checkpoint(dst, path)
    assert torch.equal(_run(src), _run(dst))


def _diffusers_names(k):
    """Wan key -> its diffusers name (test helper, the inverse of the converter for the T2V keys)."""
    import re

    rules = [(r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
             (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
             (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
             (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
             (r"^time_projection\.1\.", "condition_embedder.time_proj."),
             (r"\.self_attn\.o\.", ".attn1.to_out.0."), (r"\.cross_attn\.o\.", ".attn2.to_out.0."),
             (r"\.self_attn\.([qkv])\.", r".attn1.to_\1."), (r"\.cross_attn\.([qkv])\.", r".attn2.to_\1."),
             (r"\.self_attn\.norm_", ".attn1.norm_"), (r"\.cross_attn\.norm_", ".attn2.norm_"),
             (r"\.norm3\.", ".norm2."), (r"\.ffn\.0\.", ".ffn.net.0.proj."), (r"\.ffn\.2\.", ".ffn.net.2."),
             (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"), (r"^head\.modulation$", "scale_shift_table"),
             (r"^head\.head\.", "proj_out.")]
    for p, r in rules:
        k2, n = re.subn(p, r, k)
        if n:
            yield k2
            return
    yield k


@pytest.mark.parametrize("content, suffix, needle", [
    (b"not a checkpoint at all", ".pt", "not a torch checkpoint readable with weights_only=True"),
    (b"\x00\x01garbage", ".safetensors", "not a readable safetensors file"),
    (b"{}", ".bin", "expected a .safetensors, .pt, .pth file"),
])
def test_bad_files_are_one_line_errors(tmp_path, capsys, content, suffix, needle):
    from worldkv_connector.cli import main

    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=needle):
        load_checkpoint(build_model(TINY), path)
    rc = main(["generate", "--model", "tiny", "--checkpoint", str(path), "--num-chunks", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_loads_a_self_forcing_pt(tmp_path, capsys):
    from worldkv_connector.cli import main

    path = tmp_path / "sf.pt"
    _self_forcing_pt(path, build_model(TINY, seed=16))
    argv = ["generate", "--model", "tiny", "--checkpoint", str(path), "--num-chunks", "1", "--no-progress",
            "--num-denoising-steps", "1"]
    assert main(argv + ["--checkpoint-key", "generator_ema", "--checkpoint-prefix", "model."]) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "--checkpoint-key" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--checkpoint-prefix", "model.", "--num-chunks", "1"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_worldkv_convert_writes_a_wan_layout_file_that_generate_loads(tmp_path, capsys):
    from worldkv_connector.cli import main

    src = build_model(TINY, seed=17)
    pt = tmp_path / "sf.pt"
    _self_forcing_pt(pt, src)
    out = tmp_path / "sf.safetensors"
    assert main(["convert", str(pt), str(out), "--checkpoint-key", "generator_ema", "--checkpoint-prefix", "model.",
                 "--model", "tiny"]) == 0
    assert "wrote" in capsys.readouterr().out
    dst = build_model(TINY, seed=18)
    load_checkpoint(dst, out)
    assert torch.equal(_run(src), _run(dst))
    # a mismatch against --model is one error and writes nothing
    bad = tmp_path / "bad.safetensors"
    assert main(["convert", str(out), str(bad), "--model", "small"]) == 2
    err = capsys.readouterr().err
    assert "mis-shaped" in err and len(err.strip().splitlines()) == 1 and not bad.exists()
