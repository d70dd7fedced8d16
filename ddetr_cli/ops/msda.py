"""Multi-scale deformable attention: compiled C++/CUDA op with a pure-PyTorch fallback.

Shapes (N batch, S = sum of H*W over levels, M heads, D channels per head, Lq queries, L levels,
P points per level):

    value               [N, S, M, D]
    spatial_shapes      [L, 2]  int64 rows (H, W)
    level_start_index   [L]     int64, exclusive cumulative sum of H*W
    sampling_locations  [N, Lq, M, L, P, 2]  normalised (x, y), 0..1 covers the level
    attention_weights   [N, Lq, M, L, P]
    -> output           [N, Lq, M*D]

Locations and weights have value's dtype, or float32 beside a bfloat16 / float16 value
(reduced-precision inference keeps the geometry in float32: a bfloat16 location is off by up to a
quarter pixel on a 134-pixel level); the output has value's dtype.

Each point is sampled bilinearly like ``grid_sample(align_corners=False, padding_mode="zeros")``
at pixel (x*W - 0.5, y*H - 0.5); corners outside the level read zero.

Importing this module never builds anything. The first call of :func:`ms_deform_attn` (or
:func:`backend_info`) picks the backend from ``DDETR_MSDA_BACKEND`` (``auto`` by default,
``compiled`` or ``torch``) and, unless told ``torch``, builds the extension in ``csrc/`` (the
installed copy in ``ddetr_cli/assets/csrc``, else the checkout's top-level folder) once into
``${DDETR_CACHE:-~/.cache/ddetr}/ext/<key>``, where later processes find it. The compiled op is the
``torch.ops.ddetr.ms_deform_attn`` custom op with a fake implementation and autograd registered
here, so ``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ddetr_cli.assets import asset_dir

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_torch",
    "backend_info",
    "build_extension",
    "find_cuda_toolkit",
    "extension_cache_dir",
]

logger = logging.getLogger(__name__)

# the installed package data (ddetr_cli/assets/csrc) or the checkout's top-level csrc/
CSRC_DIR = asset_dir("csrc")
_CPU_SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp")
_CUDA_SOURCES = ("ms_deform_attn_cuda.cu",)
_HEADERS = ("ms_deform_attn.h",)  # included by every source: part of the build key
_LIB_NAME = "ddetr_msda"
_BACKEND_ENV = "DDETR_MSDA_BACKEND"
# Bump when the build recipe below changes in a way the key would not notice.
_RECIPE_VERSION = "1"


# --------------------------------------------------------------------------------------------
# Pure-PyTorch implementation
# --------------------------------------------------------------------------------------------


def _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shape/dtype/device checks that need no tensor data; raise ValueError naming the argument."""
    args = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be 4-D (N, S, M, D), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"ms_deform_attn: value must be a floating tensor, got {value.dtype}")
    n, _, m, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}"
        )
    if spatial_shapes.dtype != torch.int64:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be int64, got {spatial_shapes.dtype}")
    num_levels = spatial_shapes.shape[0]
    if num_levels < 1:
        raise ValueError("ms_deform_attn: spatial_shapes must have at least one level")
    if level_start_index.dim() != 1 or level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"ms_deform_attn: level_start_index must have shape (L,) = ({num_levels},), "
            f"got {tuple(level_start_index.shape)}"
        )
    if level_start_index.dtype != torch.int64:
        raise ValueError(f"ms_deform_attn: level_start_index must be int64, got {level_start_index.dtype}")
    if sampling_locations.dim() != 6:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be 6-D (N, Lq, M, L, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    sn, lq, sm, sl, p, two = sampling_locations.shape
    if sn != n or sm != m or sl != num_levels or two != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must have shape (N, Lq, M, L, P, 2) with N={n}, "
            f"M={m}, L={num_levels}, got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            "ms_deform_attn: attention_weights must be 5-D (N, Lq, M, L, P), "
            f"got shape {tuple(attention_weights.shape)}"
        )
    if tuple(attention_weights.shape) != (n, lq, m, num_levels, p):
        raise ValueError(
            f"ms_deform_attn: attention_weights must have shape (N, Lq, M, L, P) = "
            f"{(n, lq, m, num_levels, p)}, got {tuple(attention_weights.shape)}"
        )
    reduced = value.dtype in (torch.bfloat16, torch.float16)
    for name in ("sampling_locations", "attention_weights"):
        if args[name].dtype != value.dtype and not (reduced and args[name].dtype == torch.float32):
            raise ValueError(
                f"ms_deform_attn: {name} dtype {args[name].dtype} must match value dtype {value.dtype}"
            )
    for name, t in args.items():
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}")


def _level_sizes(spatial_shapes, level_start_index, num_positions):
    """Read the level geometry and check it against value.size(1); returns [(H, W), ...]."""
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    total = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h <= 0 or w <= 0:
            raise ValueError(f"ms_deform_attn: spatial_shapes[{lvl}] must be positive (H, W), got {(h, w)}")
        if start != total:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{lvl}] is {start} but the levels before it in "
                f"spatial_shapes hold {total} positions"
            )
        total += h * w
    if total != num_positions:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes sum(H*W) = {total} does not match value.size(1) = S = "
            f"{num_positions}"
        )
    return shapes


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample`` (any device/dtype, autograd).

    Same contract as :func:`ms_deform_attn`; returns [N, Lq, M*D].
    """
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if sampling_locations.dtype != value.dtype or attention_weights.dtype != value.dtype:
        # float32 geometry beside a reduced-precision value: sample in float32, round once
        out = ms_deform_attn_torch(value.float(), spatial_shapes, level_start_index, sampling_locations.float(),
                                   attention_weights.float())
        return out.to(value.dtype)
    n, s, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    shapes = _level_sizes(spatial_shapes, level_start_index, s)
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value_levels[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Lq, L*P] weighted by [N*M, 1, Lq, L*P]
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Building the extension
# --------------------------------------------------------------------------------------------


def extension_cache_dir() -> Path:
    """Root of the build cache: ``${DDETR_CACHE:-~/.cache/ddetr}/ext``."""
    root = os.environ.get("DDETR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ddetr")
    return Path(root) / "ext"


def _is_toolkit(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def _nvidia_wheel_include_dirs(cuda_major: str | None) -> list[str]:
    """Include folders of the ``nvidia`` pip packages that hold cusparse.h (cu13 layout first)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in map(Path, spec.submodule_search_locations):
        candidates = []
        if cuda_major:
            candidates.append(root / f"cu{cuda_major}" / "include")
        candidates += sorted(root.glob("cu*/include"), reverse=True)
        candidates.append(root / "cusparse" / "include")  # cu12-era per-library wheels
        for inc in candidates:
            if (inc / "cusparse.h").is_file():
                found.append(str(inc))
                break
    return found


def find_cuda_toolkit() -> dict | None:
    """Locate a CUDA toolkit usable for building against this torch, or None.

    Returns ``{"cuda_home": ..., "include_dirs": [...]}``. ``CUDA_HOME``/``CUDA_PATH`` win when set;
    otherwise the versioned folder matching ``torch.version.cuda`` is preferred, because the nvcc
    found on PATH may be a wrapper or link outside the toolkit (torch would then guess the wrong
    root). When the toolkit lacks cusparse.h, which torch's CUDA headers include, the include folder
    of the ``nvidia`` pip package is added.
    """
    if not torch.version.cuda:
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        if not _is_toolkit(cuda_home):
            return None
    else:
        candidates = [f"/usr/local/cuda-{torch.version.cuda}"]
        import shutil

        nvcc = shutil.which("nvcc")
        if nvcc:
            candidates.append(str(Path(nvcc).resolve().parent.parent))
        candidates.append(os.path.realpath("/usr/local/cuda"))
        major = torch.version.cuda.split(".")[0]
        candidates += sorted(
            (str(p) for p in Path("/usr/local").glob(f"cuda-{major}*")), reverse=True
        )
        cuda_home = next((c for c in candidates if _is_toolkit(c)), None)
        if cuda_home is None:
            return None
    include_dirs = []
    if not (Path(cuda_home) / "include" / "cusparse.h").is_file():
        include_dirs = _nvidia_wheel_include_dirs(torch.version.cuda.split(".")[0])
    return {"cuda_home": str(cuda_home), "include_dirs": include_dirs}


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    return flags


def _host_cpu_signature() -> str:
    """-march=native output depends on the CPU, so the CPU's feature flags are part of the key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _default_arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
    return "8.0+PTX"  # compile-only builds without a visible GPU


def _sources(with_cuda: bool) -> list[Path]:
    names = _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())
    return [CSRC_DIR / n for n in names]


def _build_key(with_cuda: bool, arch_list: str | None) -> str:
    h = hashlib.sha256()
    for src in _sources(with_cuda) + [CSRC_DIR / n for n in _HEADERS]:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for part in (
        _RECIPE_VERSION,
        torch.__version__,
        str(torch.version.cuda),
        f"cuda={with_cuda}",
        str(arch_list),
        " ".join(_cflags()),
        _host_cpu_signature(),
        platform.python_implementation(),
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


# Runs in a child process: cpp_extension.load loads the library into whichever process builds
# it, and the namespace may be registered only once per process (the parent might already hold a
# different build, or want none: compile-only builds).
_CHILD_BUILD = r"""
import json, sys
from torch.utils import cpp_extension
args = json.loads(sys.argv[1])
cpp_extension.load(is_python_module=False, **args)
"""


def _first_error_line(log: str) -> str:
    """The compiler's first diagnostic ("file:line: error: ..."), else the last line of the log."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"(^|[\s:])(fatal )?error( [A-Z]?\d+)?:", ln, re.IGNORECASE) and "Error building" not in ln:
            return ln
    return lines[-1] if lines else "no output"


def build_extension(
    with_cuda: bool,
    build_dir: str | os.PathLike | None = None,
    *,
    cuda_arch_list: str | None = None,
    verbose: bool = False,
) -> str:
    """Compile the extension (without loading it here) and return the shared library's path.

    ``with_cuda`` adds the CUDA kernels; it needs a CUDA toolkit (see :func:`find_cuda_toolkit`)
    but no GPU, so CI machines with nvcc can check that the kernels compile. ``build_dir`` defaults
    to a folder of :func:`extension_cache_dir` keyed by the sources, torch version and flags; a
    finished build there is reused without running the compiler. Concurrent builders of the same
    folder serialise on a file lock. Raises RuntimeError with the compiler's first error.
    """
    toolkit = None
    if with_cuda:
        toolkit = find_cuda_toolkit()
        if toolkit is None:
            raise RuntimeError(
                "build failed: no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc and "
                "include/cuda_runtime.h)"
            )
        cuda_arch_list = cuda_arch_list or _default_arch_list()
    for src in _sources(with_cuda):
        if not src.is_file():
            raise RuntimeError(f"build failed: source {src} not found (ddetr-cli installed without its csrc/ sources?)")
    key = _build_key(with_cuda, cuda_arch_list)
    build_dir = Path(build_dir) if build_dir is not None else extension_cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_path = build_dir / f"{_LIB_NAME}.so"
    marker = build_dir / f"{_LIB_NAME}.built"

    from filelock import FileLock  # a torch dependency

    # cpp_extension holds build_dir/lock while it builds; this outer lock (another file) also
    # covers the marker, so a reader never sees a marker without the finished library.
    with FileLock(str(build_dir / "ddetr-build.lock")):
        if marker.is_file() and lib_path.is_file():
            try:
                if json.loads(marker.read_text()).get("key") == key:
                    return str(lib_path)
            except (OSError, ValueError):
                pass
        marker.unlink(missing_ok=True)
        args = {
            "name": _LIB_NAME,
            "sources": [str(s) for s in _sources(with_cuda)],
            "extra_cflags": _cflags(),
            "extra_ldflags": ["-fopenmp"],
            "build_directory": str(build_dir),
            "with_cuda": with_cuda,
            "verbose": verbose,
        }
        env = dict(os.environ)
        if toolkit is not None:
            args["extra_cuda_cflags"] = ["-O3"]
            args["extra_include_paths"] = toolkit["include_dirs"]
            env["CUDA_HOME"] = toolkit["cuda_home"]
            env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list
        logger.info("building %s (%s) in %s", _LIB_NAME, "CPU+CUDA" if with_cuda else "CPU", build_dir)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_BUILD, json.dumps(args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode != 0 or not lib_path.is_file():
            log = proc.stdout or ""
            raise RuntimeError(f"build failed: {_first_error_line(log)}\n{log[-4000:]}")
        if verbose:
            print(proc.stdout, file=sys.stderr)
        seconds = time.perf_counter() - t0
        marker.write_text(json.dumps({"key": key, "seconds": round(seconds, 1), "with_cuda": with_cuda}))
        logger.info("built %s in %.0f s", lib_path, seconds)
    return str(lib_path)


# --------------------------------------------------------------------------------------------
# Loading, registration and backend selection
# --------------------------------------------------------------------------------------------

_lock = threading.RLock()
_state: dict | None = None  # filled once by _resolve()
_registered = False


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.ddetr.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    need = ctx.needs_input_grad
    return (
        grad_value if need[0] else None,
        None,
        None,
        grad_loc if need[3] else None,
        grad_attn if need[4] else None,
    )


def _register_python_impls() -> None:
    global _registered
    if _registered:
        return
    torch.library.register_fake("ddetr::ms_deform_attn")(_fake_forward)
    torch.library.register_fake("ddetr::ms_deform_attn_backward")(_fake_backward)
    torch.library.register_autograd("ddetr::ms_deform_attn", _backward, setup_context=_setup_context)
    _registered = True


def _ops_loaded() -> bool:
    return hasattr(torch.ops.ddetr, "ms_deform_attn") and hasattr(torch.ops.ddetr, "ms_deform_attn_backward")


def _has_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("ddetr::ms_deform_attn", "CUDA")


def _resolve() -> dict:
    """Pick the backend once per process (building the extension if needed)."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        choice = (os.environ.get(_BACKEND_ENV) or "auto").strip().lower()
        if choice not in ("auto", "compiled", "torch"):
            raise ValueError(f"{_BACKEND_ENV} must be auto, compiled or torch, got {choice!r}")
        state = {"backend": "torch", "reason": "", "cuda_kernels": False, "requested": choice, "library": None}
        if choice == "torch":
            state["reason"] = f"{_BACKEND_ENV}=torch"
        else:
            try:
                if _ops_loaded():
                    state["reason"] = "already loaded in this process"
                else:
                    with_cuda = torch.cuda.is_available() and find_cuda_toolkit() is not None
                    lib = build_extension(with_cuda)
                    torch.ops.load_library(lib)
                    state["library"] = lib
                    state["reason"] = f"built at {lib}"
                    if torch.cuda.is_available() and not with_cuda:
                        state["reason"] += " (CPU kernels only: no CUDA toolkit found; CUDA tensors use the fallback)"
                _register_python_impls()
                state["backend"] = "compiled"
                state["cuda_kernels"] = _has_cuda_kernel()
            except Exception as exc:  # noqa: BLE001 - any build/load failure selects the fallback
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if not first.startswith("build failed"):
                    first = f"build failed: {first}"
                if choice == "compiled":
                    raise RuntimeError(f"{_BACKEND_ENV}=compiled but the extension is unavailable: {first}") from exc
                state["reason"] = first
                warnings.warn(
                    f"ddetr: compiled multi-scale deformable attention unavailable ({first}); "
                    "using the slower grid_sample fallback",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state = state
        return state


def backend_info() -> dict:
    """Which implementation :func:`ms_deform_attn` uses and why (resolves the backend).

    Keys: ``backend`` ("compiled" or "torch"), ``reason``, ``cuda_kernels`` (the compiled op has
    CUDA kernels), ``requested`` (the ``DDETR_MSDA_BACKEND`` value), ``library`` (path or None),
    ``cache_dir``, ``torch``, ``cuda_toolkit`` (CUDA_HOME used for builds, or None).
    """
    state = dict(_resolve())
    toolkit = find_cuda_toolkit()
    state.update(
        cache_dir=str(extension_cache_dir()),
        torch=torch.__version__,
        cuda_toolkit=toolkit["cuda_home"] if toolkit else None,
    )
    return state


@torch.compiler.assume_constant_result
def _compiled_flags() -> int:
    # Evaluated eagerly once while torch.compile traces, so resolution (and a first build) stays
    # out of the graph. Bit 0: compiled op usable; bit 1: it has CUDA kernels.
    state = _resolve()
    return int(state["backend"] == "compiled") | (int(state["cuda_kernels"]) << 1)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; returns [N, Lq, M*D] (see the module docstring).

    Uses the compiled op when available for the tensors' device and dtype (CPU: float32/float64,
    and bfloat16/float16 forward without autograd; CUDA: float32/float16/bfloat16/float64),
    otherwise :func:`ms_deform_attn_torch`. Both raise ValueError naming the argument on
    inconsistent inputs.
    """
    flags = _compiled_flags()
    if flags & 1 and isinstance(value, torch.Tensor):
        device = value.device.type
        if device == "cpu":
            exact = value.dtype in (torch.float32, torch.float64)
            reduced_inference = value.dtype in (torch.bfloat16, torch.float16) and not (
                torch.is_grad_enabled()
                and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (value, sampling_locations, attention_weights))
            )
            if exact or reduced_inference:
                return torch.ops.ddetr.ms_deform_attn(
                    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
                )
        elif device == "cuda" and flags & 2:
            # the CUDA kernels read locations and weights in value's dtype
            return torch.ops.ddetr.ms_deform_attn(
                value, spatial_shapes, level_start_index, sampling_locations.to(value.dtype), attention_weights.to(value.dtype)
            )
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
