"""GPU code compiles on this machine without a GPU: every CUDA C++ source in csrc/ with plain
nvcc (CUDA 13 supports sm_75 and newer), and every Triton kernel ahead of time for sm_90 (the
compiled path, which the CPU interpreter never exercises)."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import worldkv_connector.csrc as csrc

NVCC = shutil.which("nvcc")
SOURCES = sorted(Path(csrc.__file__).parent.glob("*.cu"))
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile csrc/*.cu here")


def nvcc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, *args], cwd=cwd, capture_output=True, text=True, timeout=240)


def test_sources_are_found():
    assert [s.name for s in SOURCES] == sorted(csrc.SOURCES)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_to_an_object_without_warnings(source, arch, tmp_path):
    out = tmp_path / f"{source.stem}_{arch}.o"
    res = nvcc("-c", "-std=c++17", f"-arch={arch}", "--Werror", "all-warnings", str(source), "-o", str(out),
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0


@needs_nvcc
def test_copy_kernel_ptx_exports_the_entry_and_uses_16_byte_accesses(tmp_path):
    source = Path(csrc.__file__).parent / "paged_copy.cu"
    ptx = tmp_path / "paged_copy.ptx"
    res = nvcc("--ptx", "-std=c++17", "-arch=sm_90", str(source), "-o", str(ptx), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    assert ".entry wkv_copy_fragments(" in text  # extern "C": the name CuPy looks up
    assert "ld.v4.u32" in text and "st.v4.u32" in text  # int4 path


# Runs in a fresh interpreter: the kernels must be decorated with TRITON_INTERPRET unset.
AOT_SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mods = {m: importlib.import_module("worldkv_connector.kernels." + m)
            for m in ("paged_attention", "compress", "rope_delta")}

    def build(fn, types, constexprs):
        names = fn.arg_names
        sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__
        print("compiled", fn.__name__)

    t = "*bf16"
    build(mods["paged_attention"]._paged_attention_kernel,
          dict(q_ptr=t, k_ptr=t, v_ptr=t, bt_ptr="*i64", lens_ptr="*i32", o_ptr=t, qk_scale="fp32"),
          dict(GROUP=3, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, UPCAST=False, DOT_PRECISION="tf32"))
    build(mods["compress"]._centroid_kernel, dict(k_ptr=t, c_ptr="*fp32"), dict(BLOCK_T=32, BLOCK_C=256))
    build(mods["compress"]._novelty_kernel, dict(k_ptr=t, c_ptr="*fp32", out_ptr="*fp32", eps="fp32"),
          dict(BLOCK_T=32, BLOCK_C=256))
    build(mods["compress"]._gather_rows_kernel, dict(k_ptr=t, v_ptr=t, idx_ptr="*i64", out_ptr=t),
          dict(BLOCK_T=16, BLOCK_C=256))
    build(mods["rope_delta"]._rope_delta_kernel, dict(k_ptr=t, ids_ptr="*i64", lens_ptr="*i64", ang_ptr="*fp32"),
          dict(HALF=22, BLOCK_T=64, BLOCK_C=128))
    """
)


def test_triton_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("compiled") == 5
