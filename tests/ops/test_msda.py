"""Tests of the multi-scale deformable attention op (compiled CPU/CUDA kernels and fallback).

The expected values come from `reference_msda`, an independent numpy gather written here, and
from a few hand-computed samples; never from the code under test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ddetr_cli.ops import msda as op

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Independent reference and inputs
# ---------------------------------------------------------------------------------------------


def reference_msda(value, spatial_shapes, sampling_locations, attention_weights):
    """float64 numpy: for every point, gather the 4 neighbouring pixels and weight them by
    (1 - |dx|)(1 - |dy|); pixels outside the level count as zero."""
    v = value.detach().double().cpu().numpy()
    loc = sampling_locations.detach().double().cpu().numpy()
    attn = attention_weights.detach().double().cpu().numpy()
    n, _, m, d = v.shape
    lq = loc.shape[1]
    out = np.zeros((n, lq, m, d))
    n_idx = np.arange(n)[:, None, None, None]
    m_idx = np.arange(m)[None, None, :, None]
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        level = v[:, start : start + h * w].reshape(n, h, w, m, d)
        start += h * w
        px = loc[:, :, :, lvl, :, 0] * w - 0.5  # [N, Lq, M, P]
        py = loc[:, :, :, lvl, :, 1] * h - 0.5
        x0, y0 = np.floor(px), np.floor(py)
        for xi in (x0, x0 + 1):
            for yi in (y0, y0 + 1):
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                weight = (1 - np.abs(px - xi)) * (1 - np.abs(py - yi)) * inside
                xs = np.clip(xi, 0, w - 1).astype(np.int64)
                ys = np.clip(yi, 0, h - 1).astype(np.int64)
                pixels = level[n_idx, ys, xs, m_idx]  # [N, Lq, M, P, D]
                out += np.einsum("nqmp,nqmpd->nqmd", weight * attn[:, :, :, lvl], pixels)
    return torch.from_numpy(out.reshape(n, lq, m * d))


def level_tensors(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def make_inputs(n, shapes, m, d, lq, p, dtype=torch.float32, seed=0, lo=-0.25, hi=1.25):
    """Random inputs; locations drawn from [lo, hi] so some points fall partly or fully outside."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(shapes)
    s = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    num_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64).to(dtype)
    loc = (torch.rand(n, lq, m, num_levels, p, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    attn = torch.rand(n, lq, m, num_levels, p, generator=g, dtype=torch.float64).to(dtype)
    return value, spatial_shapes, level_start_index, loc, attn


CASES = {
    "1level-odd": (1, [(5, 7)], 2, 16, 10, 3),
    "4levels-batch2-d24": (2, [(6, 9), (3, 5), (2, 3), (1, 1)], 3, 24, 13, 4),
    "2levels-d32": (2, [(8, 8), (4, 4)], 2, 32, 7, 2),
    "4levels-d64": (1, [(3, 4), (2, 2), (1, 2), (5, 1)], 1, 64, 5, 2),
    "generic-d33": (1, [(4, 5), (2, 3)], 2, 33, 6, 2),
    "generic-d1": (2, [(3, 3)], 4, 1, 4, 4),
}


@pytest.fixture(scope="session")
def compiled():
    """The compiled op; fails (does not skip) when it cannot be built, unless the torch backend
    was requested explicitly."""
    info = op.backend_info()
    if info["backend"] != "compiled":
        if info["requested"] == "torch":
            pytest.skip("DDETR_MSDA_BACKEND=torch")
        pytest.fail(f"compiled op unavailable: {info['reason']}")
    return torch.ops.ddetr.ms_deform_attn


def _compiled_fn(*args):
    return torch.ops.ddetr.ms_deform_attn(*args)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_hand_computed_samples(backend, request):
    """A 2x2 level: the centre is the mean of the 4 pixels, the corner (0, 0) reads a quarter of
    pixel (0, 0) (three of its four neighbours are padding), beyond the border reads 0."""
    fn = op.ms_deform_attn_torch
    if backend == "compiled":
        request.getfixturevalue("compiled")
        fn = _compiled_fn
    spatial_shapes, level_start_index = level_tensors([(2, 2)])
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)
    loc = torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.75, 0.25], [1.5, 0.5], [-0.01, 0.5]])
    loc = loc.reshape(1, 6, 1, 1, 1, 2)
    attn = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0]).reshape(1, 6, 1, 1, 1)
    out = fn(value, spatial_shapes, level_start_index, loc, attn).flatten()
    # (0.75, 0.25) -> pixel (1.0, 0.0) = value[y=0, x=1] = 2; (-0.01, 0.5) -> x=-0.52: 0.48 * mean(1, 3)
    expected = torch.tensor([2.5, 0.25, 2 * 0.25 * 4.0, 2.0, 0.0, 0.48 * 2.0])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_compiled_matches_reference(case, compiled):
    args = make_inputs(*CASES[case], seed=1)
    expected = reference_msda(args[0], args[1], args[3], args[4])
    out = compiled(*args)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # The public entry point picks the compiled kernel for CPU float32.
    assert torch.equal(op.ms_deform_attn(*args), out)
    args64 = make_inputs(*CASES[case], dtype=torch.float64, seed=1)
    torch.testing.assert_close(compiled(*args64), reference_msda(args64[0], args64[1], args64[3], args64[4]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_torch_fallback_matches_reference(case):
    args = make_inputs(*CASES[case], seed=2)
    expected = reference_msda(args[0], args[1], args[3], args[4])
    torch.testing.assert_close(op.ms_deform_attn_torch(*args).double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_points_and_edges(compiled):
    """Locations exactly on pixel centres, level borders and far outside."""
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(1, [(4, 6), (3, 3)], 2, 16, 9, 2, seed=3)
    special = torch.tensor([0.0, 1.0, 0.5, -1.0, 2.0, 1 / 6, 1 / 12, 11 / 12, -1e-3, 1 + 1e-3])
    loc = special[torch.randint(0, len(special), loc.shape, generator=torch.Generator().manual_seed(0))]
    expected = reference_msda(value, spatial_shapes, loc, attn)
    torch.testing.assert_close(compiled(value, spatial_shapes, level_start_index, loc, attn).double(), expected,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.ms_deform_attn_torch(value, spatial_shapes, level_start_index, loc, attn).double(),
                               expected, rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_empty(compiled):
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(2, [(4, 5), (2, 2)], 2, 16, 6, 2, seed=4)
    expected = compiled(value, spatial_shapes, level_start_index, loc, attn)
    value_nc = value.transpose(0, 2).contiguous().transpose(0, 2)
    attn_nc = attn.transpose(1, 3).contiguous().transpose(1, 3)
    assert not value_nc.is_contiguous() and not attn_nc.is_contiguous()
    torch.testing.assert_close(compiled(value_nc, spatial_shapes, level_start_index, loc, attn_nc), expected)
    out = compiled(value, spatial_shapes, level_start_index, loc[:, :0], attn[:, :0])
    assert out.shape == (2, 0, 32)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["1level-odd", "4levels-batch2-d24", "generic-d33"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_autograd_of_fallback(case, dtype, compiled):
    args = make_inputs(*CASES[case], dtype=dtype, seed=5)
    grad_out = torch.randn(args[0].shape[0], args[3].shape[1], args[0].shape[2] * args[0].shape[3], dtype=dtype)
    grads = []
    for fn in (compiled, op.ms_deform_attn_torch):
        value, loc, attn = (t.clone().requires_grad_() for t in (args[0], args[3], args[4]))
        fn(value, args[1], args[2], loc, attn).backward(grad_out)
        grads.append((value.grad, loc.grad, attn.grad))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), *grads):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"grad of {name}: {m}")


def test_backward_is_deterministic(compiled):
    args = make_inputs(2, [(6, 7), (3, 4)], 4, 32, 50, 4, seed=6)
    grad_out = torch.randn(2, 50, 128)
    first = torch.ops.ddetr.ms_deform_attn_backward(grad_out, *args)
    second = torch.ops.ddetr.ms_deform_attn_backward(grad_out, *args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradcheck_float64(compiled):
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(
        2, [(3, 4), (2, 3)], 2, 3, 4, 2, dtype=torch.float64, seed=7, lo=-0.1, hi=1.1
    )
    inputs = (value.requires_grad_(), spatial_shapes, level_start_index, loc.requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(compiled, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(op.ms_deform_attn, inputs, eps=1e-6, atol=1e-5)


def test_opcheck(compiled):
    value, spatial_shapes, level_start_index, loc, attn = make_inputs(
        1, [(3, 4), (2, 2)], 2, 8, 5, 2, seed=8
    )
    torch.library.opcheck(
        torch.ops.ddetr.ms_deform_attn.default,
        (value.requires_grad_(), spatial_shapes, level_start_index, loc.requires_grad_(), attn.requires_grad_()),
    )
    grad_out = torch.randn(1, 5, 16)
    torch.library.opcheck(
        torch.ops.ddetr.ms_deform_attn_backward.default,
        (grad_out, value.detach(), spatial_shapes, level_start_index, loc.detach(), attn.detach()),
    )


class _TinyDeformAttn(torch.nn.Module):
    def __init__(self, channels=16, heads=2, levels=2, points=2):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.value_proj = torch.nn.Linear(channels, channels)
        self.offsets = torch.nn.Linear(channels, heads * levels * points * 2)
        self.weights = torch.nn.Linear(channels, heads * levels * points)

    def forward(self, query, reference, memory, spatial_shapes, level_start_index):
        n, lq, _ = query.shape
        value = self.value_proj(memory).view(n, memory.shape[1], self.heads, -1)
        offsets = self.offsets(query).view(n, lq, self.heads, self.levels, self.points, 2)
        loc = reference[:, :, None, None, None, :] + 0.1 * offsets.tanh()
        attn = self.weights(query).view(n, lq, self.heads, -1).softmax(-1)
        attn = attn.view(n, lq, self.heads, self.levels, self.points)
        return op.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)


def test_torch_compile_fullgraph(compiled):
    torch.manual_seed(0)
    module = _TinyDeformAttn()
    spatial_shapes, level_start_index = level_tensors([(4, 5), (2, 3)])
    query, reference, memory = torch.randn(2, 7, 16), torch.rand(2, 7, 2), torch.randn(2, 26, 16)
    args = (query, reference, memory, spatial_shapes, level_start_index)
    eager = module(*args)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    torch._dynamo.reset()
    compiled_module = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled_module(*args)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for got, want in zip((p.grad for p in module.parameters()), eager_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    base = make_inputs(1, [(3, 4), (2, 2)], 2, 8, 5, 2, seed=9)
    value, shapes, starts, loc, attn = base

    def with_(**kw):
        d = dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=loc,
                 attention_weights=attn)
        d.update(kw)
        return tuple(d.values())

    return {
        "value-3d": (with_(value=value[0]), "value"),
        "value-int": (with_(value=value.long()), "value"),
        "S-mismatch": (with_(value=value[:, :-1]), "spatial_shapes"),
        "shapes-int32": (with_(spatial_shapes=shapes.int()), "spatial_shapes"),
        "shapes-1d": (with_(spatial_shapes=shapes.flatten()), "spatial_shapes"),
        "shapes-negative": (with_(spatial_shapes=torch.tensor([[3, 4], [-2, -2]])), "spatial_shapes"),
        "starts-int32": (with_(level_start_index=starts.int()), "level_start_index"),
        "starts-wrong": (with_(level_start_index=torch.tensor([0, 11])), "level_start_index"),
        "starts-length": (with_(level_start_index=starts[:1]), "level_start_index"),
        "loc-5d": (with_(sampling_locations=loc[..., 0]), "sampling_locations"),
        "loc-levels": (with_(sampling_locations=loc[:, :, :, :1]), "sampling_locations"),
        "loc-dtype": (with_(sampling_locations=loc.double()), "sampling_locations"),
        "attn-shape": (with_(attention_weights=attn[..., :1]), "attention_weights"),
        "attn-dtype": (with_(attention_weights=attn.double()), "attention_weights"),
        "attn-device": (with_(attention_weights=attn.to("meta")), "attention_weights"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_bad_inputs_raise_naming_the_argument(case, backend, request):
    fn = op.ms_deform_attn_torch
    if backend == "compiled":
        request.getfixturevalue("compiled")
        fn = _compiled_fn
    args, name = BAD[case]
    with pytest.raises(ValueError, match=name):
        fn(*args)


def test_bad_grad_output_shape(compiled):
    value, shapes, starts, loc, attn = make_inputs(1, [(3, 4)], 2, 8, 5, 2, seed=10)
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.ddetr.ms_deform_attn_backward(torch.zeros(1, 5, 15), value, shapes, starts, loc, attn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_reduced_precision_forward(case, dtype, compiled):
    """bfloat16 / half value with float32 locations and weights (reduced-precision inference): the
    CPU kernel accumulates in float32 and rounds once, so it equals the float32 kernel on the same
    rounded values, rounded, to one rounding step (and the independent reference to the rounding)."""
    value, shapes, starts, loc, attn = make_inputs(*CASES[case], seed=13)
    low = value.to(dtype)
    out = op.ms_deform_attn(low, shapes, starts, loc, attn)
    assert out.dtype == dtype
    via_float = compiled(low.float(), shapes, starts, loc, attn).to(dtype)
    eps = torch.finfo(dtype).eps
    # equal, or one rounding step apart where float32 FMA contraction differs by a last bit
    torch.testing.assert_close(out, via_float, rtol=eps, atol=0)
    torch.testing.assert_close(out.double(), reference_msda(low, shapes, loc, attn), rtol=eps, atol=eps)
    # weights in the value's dtype are accepted too; the torch fallback agrees to the rounding
    torch.testing.assert_close(op.ms_deform_attn(low, shapes, starts, loc, attn.to(dtype)).double(),
                               reference_msda(low, shapes, loc, attn.to(dtype)), rtol=eps, atol=eps)
    torch.testing.assert_close(op.ms_deform_attn_torch(low, shapes, starts, loc, attn).double(),
                               reference_msda(low, shapes, loc, attn), rtol=eps, atol=eps)


def test_cpu_reduced_precision_with_autograd_uses_fallback(compiled):
    """No reduced-precision CPU backward kernel: with autograd the public entry point samples with
    grid_sample, and gradients flow."""
    value, shapes, starts, loc, attn = make_inputs(1, [(3, 4)], 2, 8, 5, 2, seed=11)
    low = value.bfloat16().requires_grad_()
    out = op.ms_deform_attn(low, shapes, starts, loc, attn)
    out.float().sum().backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16 and low.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sampling_locations"):  # float32 beside float32 only
        op.ms_deform_attn(value, shapes, starts, loc.bfloat16(), attn)


# ---------------------------------------------------------------------------------------------
# Backend selection and building
# ---------------------------------------------------------------------------------------------


def _run_child(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("DDETR_MSDA_BACKEND", None)
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_env_torch_selects_fallback():
    res = _run_child(
        """
        import json, warnings
        warnings.simplefilter("error")
        from ddetr_cli.ops import msda as op
        print(json.dumps(op.backend_info()))
        """,
        DDETR_MSDA_BACKEND="torch",
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["backend"] == "torch" and "DDETR_MSDA_BACKEND=torch" in info["reason"]
    assert info["cuda_kernels"] is False


def test_env_invalid_value_is_rejected():
    res = _run_child("from ddetr_cli.ops import msda; msda.backend_info()", DDETR_MSDA_BACKEND="fast")
    assert res.returncode != 0 and "DDETR_MSDA_BACKEND" in res.stderr


def test_second_process_reuses_cached_build(compiled):
    info = op.backend_info()
    res = _run_child(
        """
        import json, time
        t0 = time.perf_counter()
        from ddetr_cli.ops import msda as op
        info = op.backend_info()
        info["seconds"] = time.perf_counter() - t0
        print(json.dumps(info))
        """,
        DDETR_MSDA_BACKEND="compiled",
    )
    assert res.returncode == 0, res.stderr
    child = json.loads(res.stdout.strip().splitlines()[-1])
    assert child["backend"] == "compiled"
    if info["library"]:
        assert child["library"] == info["library"]
    assert child["seconds"] < 30, "the cached build should load without compiling"


def _broken_csrc(tmp_path: Path) -> Path:
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    for src in csrc.glob("*.c*"):  # a missing header is fatal at once (#error is not)
        src.write_text('#include "deliberately_broken_for_the_test.h"\n' + src.read_text())
    return csrc


@pytest.mark.parametrize("requested", ["auto", "compiled"])
def test_build_failure(requested, tmp_path):
    """auto: one warning and the fallback (with the compiler's error as reason); compiled: error."""
    csrc = _broken_csrc(tmp_path)
    res = _run_child(
        f"""
        import json, warnings
        from pathlib import Path
        from ddetr_cli.ops import msda as op
        import torch
        op.CSRC_DIR = Path({str(csrc)!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = op.backend_info()
            args = (torch.zeros(1, 1, 1, 2), torch.tensor([[1, 1]]), torch.tensor([0]),
                    torch.zeros(1, 1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 1))
            op.ms_deform_attn(*args)
            op.ms_deform_attn(*args)
        info["warnings"] = [str(w.message) for w in caught if "ddetr" in str(w.message)]
        print(json.dumps(info))
        """,
        DDETR_MSDA_BACKEND=requested,
        DDETR_CACHE=str(tmp_path / "cache"),
    )
    if requested == "compiled":
        assert res.returncode != 0
        assert "RuntimeError" in res.stderr and "deliberately_broken" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["backend"] == "torch"
    assert info["reason"].startswith("build failed") and "deliberately_broken" in info["reason"]
    assert len(info["warnings"]) == 1


def test_import_does_not_build(tmp_path):
    res = _run_child(
        """
        import torch
        import ddetr_cli.ops.msda as op
        assert op._state is None
        assert not hasattr(torch.ops.ddetr, "ms_deform_attn")
        """,
        DDETR_CACHE=str(tmp_path / "empty-cache"),
    )
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "empty-cache").exists()


def test_find_cuda_toolkit_layout():
    toolkit = op.find_cuda_toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit / CPU-only torch")
    home = Path(toolkit["cuda_home"])
    assert (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()
    headers = [home / "include"] + [Path(p) for p in toolkit["include_dirs"]]
    assert any((h / "cusparse.h").is_file() for h in headers), "torch's CUDA headers need cusparse.h"


@pytest.mark.slow
def test_cuda_sources_compile():
    """Compiles (does not run) the CUDA kernels; needs nvcc and a CUDA torch, not a GPU."""
    if not torch.version.cuda or op.find_cuda_toolkit() is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit (nvcc)")
    lib = op.build_extension(with_cuda=True, cuda_arch_list="9.0")
    assert Path(lib).is_file() and Path(lib).stat().st_size > 0
    res = subprocess.run(["nm", "-D", "-C", lib], capture_output=True, text=True)
    if res.returncode == 0:
        assert "ms_deform_attn_cuda" in res.stdout or "cudaLaunchKernel" in res.stdout


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_args(case, dtype=torch.float32, seed=12):
    return [(a.to(dtype) if a.is_floating_point() else a).cuda() for a in make_inputs(*CASES[case], seed=seed)]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_forward_matches_reference(case, compiled):
    if not op.backend_info()["cuda_kernels"]:
        pytest.fail("compiled op has no CUDA kernels although a GPU is present")
    args = _cuda_args(case)
    expected = reference_msda(args[0], args[1].cpu(), args[3], args[4])
    out = op.ms_deform_attn(*args)
    assert out.is_cuda
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["4levels-batch2-d24", "2levels-d32", "generic-d33"])
def test_cuda_low_precision_matches_float32(case, dtype, compiled):
    low = _cuda_args(case, dtype)
    # Same rounded inputs in float32, so only the kernel's own error is measured.
    high = [a.float() if a.is_floating_point() else a for a in low]
    out = torch.ops.ddetr.ms_deform_attn(*low)
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.float(), torch.ops.ddetr.ms_deform_attn(*high), rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)
    g_low = torch.ops.ddetr.ms_deform_attn_backward(grad_out, *low)
    g_high = torch.ops.ddetr.ms_deform_attn_backward(grad_out.float(), *high)
    for a, b in zip(g_low, g_high):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=tol * 5, atol=tol * 5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", ["1level-odd", "4levels-batch2-d24", "generic-d33"])
def test_cuda_backward_matches_cpu(case, compiled):
    cpu = make_inputs(*CASES[case], seed=13)
    grad_out = torch.randn(cpu[0].shape[0], cpu[3].shape[1], cpu[0].shape[2] * cpu[0].shape[3])
    want = torch.ops.ddetr.ms_deform_attn_backward(grad_out, *cpu)
    got = torch.ops.ddetr.ms_deform_attn_backward(grad_out.cuda(), *[a.cuda() for a in cpu])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
