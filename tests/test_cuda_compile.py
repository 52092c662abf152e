"""Compile checks of the CUDA engine (csrc/cuda) that need nvcc but no GPU.

setup.py compiles csrc/cuda only when torch itself was built with CUDA; on a machine with a
CPU-only torch these tests are the check that the CUDA sources compile at all:

* test_kernels_compile: csrc/cuda/kernels_<dtype>.cu (the launchers of launchers.cuh with the
  math of csrc/cells.h, explicitly instantiated for every cell, one file per float / double /
  half / bfloat16) compiled with nvcc alone, for sm_80 and sm_90. No torch header is involved,
  so it is fast.
* test_engine_compiles: csrc/cuda/engine.cu and options_engine.cu (the host code: ATen GEMMs,
  the time loops, the op registration) compiled with `nvcc -c` against the installed torch's
  headers, and their calls of the launchers matched against the instantiations in the
  kernels_*.cu objects (nm). A
  CPU-only torch wheel ships the c10/cuda headers but not the header CMake generates for a
  CUDA build (c10/cuda/impl/cuda_cmake_macros.h); the test writes a stand-in for it into its
  temporary folder when it is missing. No link: a CPU-only torch has no libc10_cuda to link against.

* test_engine_host_emulation: engine.cu (with RNNFAST_CUDA_HOST_EMULATION: it registers itself
  for CPU tensors) and the kernels_*.cu files compiled by the host C++ compiler, where each
  kernel launch becomes a loop over its threads' bodies, linked into one library, loaded in a
  subprocess (its ops.cpp would clash with rnnfast._C), and its outputs, gradients and workspace
  shape compared with the CPU engine's (run in a subprocess too) for every cell, dtype (float64
  / float32 / float16 / bfloat16), projection, lengths, direction, one step and an empty batch;
  once with the sequence kernels (each emulated block runs its rows' whole time loop; the
  emulated device has 2 multiprocessors, so blocks hold several rows), once with
  RNNFAST_SEQUENCE_KERNELS=0 (the GEMM-per-step loop) and once with RNNFAST_CUDA_PERSISTENT=1
  (the persistent kernels: the hidden units split over the 2 emulated blocks, which run one
  after the other between grid barriers) and once with RNNFAST_CUDA_WARP_KERNELS=1 (the warp
  kernels: each emulated warp is 32 fibers on one host thread, one per lane, that meet at every
  shuffle). This checks the CUDA engine's host logic and indexing without a GPU; what it cannot
  check (the kernels running on a device, cuBLAS, barriers, L1 coherence) is for
  tests/test_cuda.py.
* test_options_host_emulation: options_engine.cu in the same emulation library (built once for
  both tests), its rnnfast::forward_with_options / backward_with_options against the CPU
  engine's for every cell x OPTIONS_VARIANTS (layer normalisation of all three or of one, no
  bias, recurrent dropout mask, zoneout masks or inference probabilities, lengths, reverse, no
  initial state, projection, one step, no saving) x float64 / float32: every output, saved
  tensor and gradient. The row kernels' block reductions run as one thread per block here.

All are skipped only where nvcc is not found (PATH, then $CUDA_HOME/bin).
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuda_engine_paths import ENGINE_PATHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
# The translation units that instantiate the launchers, one per dtype.
KERNEL_SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "kernels_*.cu")))
# The host code: the engine of rnnfast::forward / backward, and that of the cell options.
HOST_SOURCES = ["engine.cu", "options_engine.cu"]
DTYPES = 4
CELLS = 7
# Launchers per object: 7 cells x (forward and backward of: step, sequence, persistent, warp)
# plus 2 projection helpers; the float and double objects add the cell options' 7 cells x
# (forward row, backward row) plus 4 (projection, gradient split, carry, input normalisation's
# backward).
LAUNCHERS = CELLS * 8 + 2
OPTIONS_LAUNCHERS = CELLS * 2 + 4
OPTIONS_DTYPES = ("float", "double")


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# The flags torch's CUDAExtension gives nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS)
# plus setup.py's own: the kernels must compile with the half / bfloat16 conversions of
# cuda_fp16.h / cuda_bf16.h switched off, as they are in the real build.
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-DRNNFAST_WITH_CUDA",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def _nvcc(args, timeout):
    result = subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"nvcc failed ({result.returncode}):\n{' '.join([NVCC, *args])}\n"
        f"{result.stdout[-8000:]}\n{result.stderr[-8000:]}")
    return result


def _compile_kernels(arch, out_dir):
    """The objects of every kernels_*.cu for `arch`, compiled at most one per CPU core at once."""
    def compile_one(source):
        name = os.path.splitext(os.path.basename(source))[0]
        target = os.path.join(out_dir, f"{name}_{arch}.o")
        _nvcc([*NVCC_FLAGS, f"-arch={arch}", "-c", source, "-o", target], timeout=600)
        return target

    assert len(KERNEL_SOURCES) == DTYPES, KERNEL_SOURCES
    with ThreadPoolExecutor(max_workers=min(len(KERNEL_SOURCES), os.cpu_count() or 1)) as pool:
        return list(pool.map(compile_one, KERNEL_SOURCES))


def _symbols(obj, kinds):
    """Mangled names of the symbols of `obj` whose nm type letter is in `kinds`."""
    listing = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-2] in kinds:
            names.add(parts[-1])
    return names


@pytest.fixture(scope="module")
def kernel_objects(tmp_path_factory):
    """arch -> the kernels_*.cu objects for it, compiled once per test run."""
    compiled = {}

    def objects(arch):
        if arch not in compiled:
            compiled[arch] = _compile_kernels(arch, str(tmp_path_factory.mktemp(arch)))
        return compiled[arch]
    return objects


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile(arch, kernel_objects):
    targets = kernel_objects(arch)
    assert all(os.path.getsize(target) > 0 for target in targets)
    if shutil.which("nm"):
        # Every launcher of every cell x dtype is there, each dtype's in its own object
        # (LAUNCHERS, and OPTIONS_LAUNCHERS more in the float and double ones), none defined
        # twice.
        per_object = [{name for name in _symbols(target, {"T", "W"}) if "launch_" in name}
                      for target in targets]
        for target, launchers in zip(targets, per_object):
            dtype = os.path.basename(target).split("_")[1]
            expected = LAUNCHERS + (OPTIONS_LAUNCHERS if dtype in OPTIONS_DTYPES else 0)
            assert len(launchers) == expected, (target, sorted(launchers))
        assert len(set().union(*per_object)) == (
            DTYPES * LAUNCHERS + len(OPTIONS_DTYPES) * OPTIONS_LAUNCHERS)


def _torch_cuda_headers():
    """torch's include folders when they hold the c10/cuda headers, else None."""
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    paths = include_paths()
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAGuard.h")) for p in paths):
        return None
    return paths, torch


def test_engine_compiles(tmp_path, kernel_objects):
    found = _torch_cuda_headers()
    if found is None:
        pytest.skip("the installed torch ships no c10/cuda headers")
    paths, torch = found
    includes = [f"-I{p}" for p in paths]
    generated = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not any(os.path.isfile(os.path.join(p, generated)) for p in paths):
        # CPU-only wheel: stand in for the header a CUDA build of torch generates.
        shim = tmp_path / "shim"
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{shim}")
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))

    # The host code unoptimised (-O0 after NVCC_FLAGS' -O3): what is checked is that it compiles
    # and which launchers it calls; optimising it took a fifth longer (34 s against 27 on a Xeon).
    def compile_host(source):
        target = str(tmp_path / f"{os.path.splitext(source)[0]}.o")
        _nvcc([*NVCC_FLAGS, "-O0", "-arch=sm_80", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
               *includes, "-c", os.path.join(CUDA_DIR, source), "-o", target], timeout=900)
        return source, target

    with ThreadPoolExecutor(max_workers=min(len(HOST_SOURCES), os.cpu_count() or 1)) as pool:
        objects = list(pool.map(compile_host, HOST_SOURCES))
    assert all(os.path.getsize(target) > 0 for _, target in objects)
    if shutil.which("nm"):
        # The host code calls the launchers; the kernels_*.cu objects must instantiate every one
        # it calls.
        defined = set().union(*(_symbols(target, {"T", "W"}) for target in kernel_objects("sm_80")))
        for source, target in objects:
            needed = {name for name in _symbols(target, {"U"}) if "launch_" in name}
            assert needed, f"{source} calls no launcher: the extern declarations did not apply"
            missing = needed - defined
            assert not missing, (
                f"launchers {source} calls but no kernels_*.cu defines: {sorted(missing)}")


# ------------------------------------------------------------------------------------------
# Host emulation of the CUDA engine against the CPU engine
# ------------------------------------------------------------------------------------------

EMULATION_GATES = {"lstm": 4, "lstm_relu": 4, "lstm_sigmoid": 4, "gru": 3, "elman_tanh": 1,
                   "elman_relu": 1, "elman_sigmoid": 1}
EMULATION_VARIANTS = {
    "plain": dict(),
    "reverse": dict(reverse=True),
    "nobias": dict(bias=False),
    "lengths": dict(lengths=[5, 1, 3, 0]),
    "lengths_reverse": dict(lengths=[2, 5, 0, 4], reverse=True),
    "proj": dict(proj=3),
    "proj_lengths": dict(proj=3, lengths=[4, 5, 0, 2]),
    "proj_lengths_reverse": dict(proj=2, lengths=[5, 3, 1, 4], reverse=True),
    "one_step": dict(steps=1),
    "empty_batch": dict(batch=0),
    "inference": dict(save=False, lengths=[5, 2, 3, 4]),
    "zero_state": dict(initial_state=False),
    "zero_state_lengths_reverse": dict(initial_state=False, lengths=[2, 5, 1, 4], reverse=True),
    # A packed sequence's order: the CPU engine saves the active rows only, the CUDA engine all.
    "sorted_lengths_reverse": dict(lengths=[5, 4, 2, 0], reverse=True),
}
EMULATION_DTYPES = ["float64", "float32", "float16", "bfloat16"]
# ||emulated - cpu||_inf / ||cpu||_inf per dtype (the engines differ only in the order of GEMM
# sums and in exp / tanh implementations).
EMULATION_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
# In float16 / bfloat16 the engines may round different partial sums (the CUDA engine folds
# b_hh into the input projection, the CPU engine adds it per step), and a recurrence with large
# weights can amplify one rounding step by step; there each engine is compared with a float64
# run of the same arguments: the emulated engine's error may be at most twice the CPU engine's
# plus EMULATION_TOL.
HALF_DTYPES = ("float16", "bfloat16")


def _emulation_cases():
    for cell in EMULATION_GATES:
        for name, variant in EMULATION_VARIANTS.items():
            if "proj" in variant and not cell.startswith("lstm"):
                continue
            for dtype in EMULATION_DTYPES:
                yield cell, name, variant, dtype


def _emulation_run(cell, variant, dtype_name, seed, in_float64=False):
    """One forward (and backward) of the ops with random arguments; results by name.
    in_float64: the same (dtype-rounded) arguments computed in float64, a ground truth."""
    import torch

    args, rand = _emulation_args(cell, variant, dtype_name, seed)
    if in_float64:
        args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]
        rounded_rand = rand
        rand = lambda *shape: rounded_rand(*shape).double()  # noqa: E731
    steps, batch, _ = args[1].shape
    state, hidden = args[5].shape[1], args[4].shape[0] // EMULATION_GATES[cell]
    lstm = cell.startswith("lstm")
    output, h_n, c_n, workspace = torch.ops.rnnfast.forward(*args)
    result = dict(output=output, h_n=h_n, c_n=c_n, workspace=workspace)
    if variant.get("save", True):
        _, x, hx, cx, w_ih, w_hh, b_ih, _, w_hr, lengths_t, reverse, _ = args
        grads = torch.ops.rnnfast.backward(
            cell, rand(steps, batch, state), rand(batch, state), rand(batch, hidden) if lstm
            else None, x, hx, cx, w_ih, w_hh, b_ih is not None, w_hr, lengths_t, reverse,
            output, workspace, True)
        names = ["grad_input", "grad_hx", "grad_cx", "grad_w_ih", "grad_w_hh", "grad_b_ih",
                 "grad_b_hh", "grad_w_hr"]
        result.update(zip(names, grads))
    return result


def _emulation_args(cell, variant, dtype_name, seed):
    """Random arguments of rnnfast::forward (schema order) and the generator of more."""
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seed)
    steps, batch, input_size, hidden = variant.get("steps", 5), variant.get("batch", 4), 3, 6
    proj = variant.get("proj", 0)
    state = proj or hidden
    gates = EMULATION_GATES[cell] * hidden
    lstm = cell.startswith("lstm")

    def rand(*shape):
        return (0.8 * torch.randn(*shape, generator=generator)).to(dtype)

    lengths = variant.get("lengths")
    initial_state = variant.get("initial_state", True)
    args = [cell, rand(steps, batch, input_size), rand(batch, state) if initial_state else None,
            rand(batch, hidden) if lstm and initial_state else None, rand(gates, input_size),
            rand(gates, state),
            rand(gates) if variant.get("bias", True) else None,
            rand(gates) if variant.get("bias", True) else None,
            rand(state, hidden) if proj else None,
            torch.tensor(lengths[:batch], dtype=torch.int64) if lengths else None,
            variant.get("reverse", False), variant.get("save", True)]
    return args, rand


def _emulation_check_autocast():
    """The engine's autocast rule (registered for AutocastCPU in the emulation build, for
    AutocastCUDA in the real one): the forward runs in the autocast dtype, float64 stays."""
    import torch

    for cell, variant in (("lstm", dict(proj=3, lengths=[5, 2, 3, 4])), ("gru", dict())):
        args, _ = _emulation_args(cell, variant, "float32", 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = torch.ops.rnnfast.forward(*args)
        cast = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args]
        expected = torch.ops.rnnfast.forward(*cast)
        for a, b in zip(actual, expected):
            assert a.dtype == torch.bfloat16, f"{cell}: autocast gave {a.dtype}"
            assert torch.equal(a, b), f"{cell}: autocast result differs from a bfloat16 call"
        args64, _ = _emulation_args(cell, variant, "float64", 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = torch.ops.rnnfast.forward(*args64)
        assert result[0].dtype == torch.float64, "autocast must leave float64 alone"


def _emulation_results():
    return {f"{cell}/{name}/{dtype}": _emulation_run(cell, variant, dtype, seed)
            for seed, (cell, name, variant, dtype) in enumerate(_emulation_cases())}


def _emulation_truth():
    """float64 runs of the float16 / bfloat16 cases' arguments."""
    return {f"{cell}/{name}/{dtype}": _emulation_run(cell, variant, dtype, seed, in_float64=True)
            for seed, (cell, name, variant, dtype) in enumerate(_emulation_cases())
            if dtype in HALF_DTYPES}


_EMULATION_ENGINE = """\
// Generated by tests/test_cuda_compile.py: the CUDA engine's host code, registered for CPU
// tensors.
#define RNNFAST_CUDA_HOST_EMULATION 1
#include "{source}"
"""
_EMULATION_KERNELS = """\
// Generated by tests/test_cuda_compile.py: launchers that run the kernels as host loops.
#include "{source}"
"""

_EMULATION_BUILD = """\
import sys, torch
from torch.utils.cpp_extension import load
*sources, include, build = sys.argv[1:]
load(name="rnnfast_cuda_emulation", sources=sources, extra_cflags=["-O1"],
     extra_include_paths=[include], build_directory=build, is_python_module=False)
"""


def _cuda_include_dir():
    for candidate in (os.path.join(os.path.dirname(os.path.dirname(NVCC)), "include"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
                      "/usr/local/cuda/include"):
        if os.path.isfile(os.path.join(candidate, "cuda_fp16.h")):
            return candidate
    return None


@pytest.fixture(scope="module")
def emulation_library(tmp_path_factory):
    """The CUDA engine's host code (engine.cu, options_engine.cu) and the kernels_*.cu files
    built by the host C++ compiler into one library, once per test run."""
    pytest.importorskip("torch")
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA include folder with cuda_fp16.h next to nvcc")
    if shutil.which("ninja") is None:
        pytest.skip("torch.utils.cpp_extension.load needs ninja")
    folder = tmp_path_factory.mktemp("emulation")
    # One C++ file per CUDA file, as the extension builds them: the launchers the host code calls
    # are found at link time in the kernels_*.cu objects.
    sources = []
    for cuda_source, template in [*((os.path.join(CUDA_DIR, h), _EMULATION_ENGINE)
                                    for h in HOST_SOURCES),
                                  *((k, _EMULATION_KERNELS) for k in KERNEL_SOURCES)]:
        name = os.path.splitext(os.path.basename(cuda_source))[0]
        source = folder / f"{name}_emulation.cpp"
        source.write_text(template.format(source=cuda_source))
        sources.append(str(source))
    build = folder / "build"
    build.mkdir()
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    result = subprocess.run(
        [sys.executable, "-c", _EMULATION_BUILD,
         *(os.path.join(ROOT, "csrc", name) for name in
           ("ops.cpp", "layer.cpp", "buffer_pool.cpp", "layer_options.cpp")),
         *sources, include, str(build)],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"emulation build failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return build / "rnnfast_cuda_emulation.so"


def _run_cpu_reference(flag, results_file):
    """The CPU engine (rnnfast._C) in a subprocess, so a crash is a failure, not the end of the
    test session."""
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), flag, str(results_file)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    code = result.returncode
    why = signal.Signals(-code).name if code < 0 else f"exit status {code}"
    assert code == 0, f"CPU engine run failed ({why}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"


def test_engine_host_emulation(tmp_path, emulation_library):
    torch = pytest.importorskip("torch")
    library = emulation_library
    # The emulated engine runs in its own process: its ops.cpp defines the ops as rnnfast._C does.
    # Once per path of ENGINE_PATHS: the sequence kernels (where a layer fits), the
    # GEMM-per-step loop, the persistent kernels and the warp kernels.
    emulated_runs = {}
    for name, settings in ENGINE_PATHS.items():
        results_file = tmp_path / f"emulated_{name}.pt"
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--emulate", str(library),
             str(results_file)],
            capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
            env=dict(os.environ, **settings))
        assert result.returncode == 0, (
            f"emulated run ({name}) failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
        emulated_runs[name] = torch.load(str(results_file))
    reference_file = tmp_path / "cpu.pt"
    _run_cpu_reference("--reference", reference_file)
    saved = torch.load(str(reference_file))
    expected, truth = saved["results"], saved["truth"]
    failures = []
    for name, emulated in emulated_runs.items():
        assert sorted(emulated) == sorted(expected)
        failures += _emulation_failures(emulated, expected, truth, f"{name}: ")
    assert not failures, "\n".join(failures)


def _emulation_failures(emulated, expected, truth, label):
    """The emulated engine's results against the CPU engine's (float16 / bfloat16: against
    float64, no worse than twice the CPU engine's error)."""
    failures = []
    for key, values in expected.items():
        tol = EMULATION_TOL[key.rsplit("/", 1)[1]]
        assert sorted(emulated[key]) == sorted(values), key
        for name, value in values.items():
            actual = emulated[key][name]
            # The workspace's columns are shared (the fake implementation); with lengths its
            # rows are each engine's own.
            shape = (lambda t: t.shape[1:]) if name == "workspace" else (lambda t: t.shape)
            if shape(actual) != shape(value) or actual.dtype != value.dtype:
                failures.append(f"{label}{key} {name}: {actual.dtype}{tuple(actual.shape)} != "
                                f"{value.dtype}{tuple(value.shape)}")
                continue
            if value.numel() == 0 or name == "workspace":
                # The workspace's layout is each engine's own (the CPU engine may pack the
                # gates of small layers, or a packed sequence's rows); the gradients, computed
                # from it, check its contents.
                continue
            def relative_error(a, b):
                a, b = a.double(), b.double()
                scale = b.abs().max().item()
                return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)

            if key in truth:
                exact = truth[key][name]
                err, cpu_err = relative_error(actual, exact), relative_error(value, exact)
                if not err <= 2 * cpu_err + tol:
                    failures.append(f"{label}{key} {name}: relative error to float64 {err:.3e} > "
                                    f"2 x the CPU engine's {cpu_err:.3e} + {tol:.0e}")
                continue
            err = relative_error(actual, value)
            if not err <= tol:
                failures.append(f"{label}{key} {name}: relative error {err:.3e} > {tol:.0e}")
    return failures


# ------------------------------------------------------------------------------------------
# Host emulation of the cell options' ops (options_engine.cu) against the CPU engine
# ------------------------------------------------------------------------------------------

# Variants of the options' layer: which options, and the layer's shape and direction.
# norm: layer normalisation of xg, hg and (LSTM) the cell state ("no_cell_bias": without
# norm_cell_bias; "ih", "hh": of one of them only); dropout: a recurrent mask; zoneout: masks of
# h and c (training), or zoneout_p: the probabilities (inference's expectation).
OPTIONS_VARIANTS = {
    "plain": dict(),
    "norm": dict(norm="all"),
    "norm_ih_nobias": dict(norm="ih", bias=False),
    "norm_hh_no_cell_bias": dict(norm="hh_no_cell_bias"),
    "dropout_zoneout": dict(dropout=True, zoneout=True),
    "zoneout_p": dict(norm="all", zoneout_p=(0.3, 0.2)),
    "inference": dict(norm="all", zoneout_p=(0.4, 0.1), save=False, lengths=[5, 2, 0, 4]),
    "all_lengths": dict(norm="all", dropout=True, zoneout=True, lengths=[5, 1, 3, 0]),
    "all_lengths_reverse": dict(norm="all", dropout=True, zoneout=True, lengths=[2, 5, 0, 4],
                                reverse=True),
    "all_nohx_reverse": dict(norm="all", dropout=True, zoneout=True, initial_state=False,
                             reverse=True),
    "proj": dict(norm="all", dropout=True, zoneout=True, proj=3),
    "proj_lengths_reverse": dict(norm="all", zoneout=True, proj=2, lengths=[5, 3, 1, 4],
                                 reverse=True, initial_state=False),
    "one_step": dict(norm="all", zoneout=True, steps=1),
}
# ||emulated - cpu||_inf / ||cpu||_inf per dtype.
OPTIONS_TOL = {"float64": 1e-12, "float32": 1e-5}
OPTIONS_FORWARD = ["output", "h_n", "c_n", "cell_saved", "h_prev", "c_prev", "h_cell", "norm_ih",
                   "norm_hh", "norm_cell", "rstd"]
OPTIONS_GRADIENTS = ["grad_input", "grad_hx", "grad_cx", "grad_w_ih", "grad_w_hh", "grad_b_ih",
                     "grad_b_hh", "grad_w_hr", "grad_norm_ih_weight", "grad_norm_hh_weight",
                     "grad_norm_cell_weight", "grad_norm_cell_bias"]


def _options_cases():
    for cell in EMULATION_GATES:
        for name, variant in OPTIONS_VARIANTS.items():
            if "proj" in variant and not cell.startswith("lstm"):
                continue
            for dtype in OPTIONS_TOL:
                yield cell, name, variant, dtype


def _options_run(cell, variant, dtype_name, seed):
    """rnnfast::forward_with_options (and backward_with_options) with random arguments from a
    seeded generator; every result by name."""
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seed)
    steps, batch, input_size, hidden = variant.get("steps", 5), 4, 3, 6
    proj = variant.get("proj", 0)
    state = proj or hidden
    gates = EMULATION_GATES[cell] * hidden
    lstm = cell.startswith("lstm")

    def rand(*shape, scale=0.8):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    def gain(size):
        return 1 + rand(size, scale=0.3)

    def keep_mask(*shape, p):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) < p).to(dtype)

    norm = variant.get("norm", "")
    bias = variant.get("bias", True)
    initial_state = variant.get("initial_state", True)
    lengths = variant.get("lengths")
    zoneout_p, zoneout_cell_p = variant.get("zoneout_p", (0.0, 0.0))
    zoneout_cell_p = zoneout_cell_p if lstm else 0.0
    x = rand(steps, batch, input_size)
    hx = rand(batch, state) if initial_state else None
    cx = rand(batch, hidden) if lstm and initial_state else None
    w_ih, w_hh = rand(gates, input_size), rand(gates, state)
    b_ih = rand(gates) if bias else None
    b_hh = rand(gates) if bias else None
    w_hr = rand(state, hidden) if proj else None
    norm_ih = gain(gates) if norm in ("all", "ih") else None
    norm_hh = gain(gates) if norm in ("all", "hh_no_cell_bias") else None
    norm_cell = gain(hidden) if lstm and norm in ("all", "hh_no_cell_bias") else None
    norm_cell_bias = rand(hidden, scale=0.2) if lstm and norm == "all" else None
    recurrent_mask = keep_mask(batch, state, p=0.7) / 0.7 if variant.get("dropout") else None
    zoneout = variant.get("zoneout", False)
    zoneout_mask = keep_mask(steps, batch, state, p=0.3) if zoneout else None
    zoneout_cell_mask = keep_mask(steps, batch, hidden, p=0.25) if zoneout and lstm else None
    lengths_t = torch.tensor(lengths, dtype=torch.int64) if lengths else None
    reverse, save = variant.get("reverse", False), variant.get("save", True)
    forward = torch.ops.rnnfast.forward_with_options(
        cell, x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, norm_ih, norm_hh, norm_cell,
        norm_cell_bias, recurrent_mask, zoneout_mask, zoneout_cell_mask, zoneout_p,
        zoneout_cell_p, lengths_t, reverse, save)
    result = dict(zip(OPTIONS_FORWARD, forward))
    if result["rstd"].numel() > 0:
        # rstd [T, B, 3] has a column per normalisation: those of absent ones are never written.
        present = [norm_ih is not None, norm_hh is not None, norm_cell is not None]
        result["rstd"] = result["rstd"][..., torch.tensor(present)]
    if save:
        grads = torch.ops.rnnfast.backward_with_options(
            cell, rand(steps, batch, state), rand(batch, state),
            rand(batch, hidden) if lstm else None, x, w_ih, w_hh, bias, w_hr, norm_ih, norm_hh,
            norm_cell, norm_cell_bias is not None, recurrent_mask, zoneout_mask,
            zoneout_cell_mask, zoneout_p, zoneout_cell_p, lengths_t, reverse, *forward[3:], True)
        result.update(zip(OPTIONS_GRADIENTS, grads))
    return result


def _options_results():
    return {f"{cell}/{name}/{dtype}": _options_run(cell, variant, dtype, seed)
            for seed, (cell, name, variant, dtype) in enumerate(_options_cases())}


def _relative_error(actual, expected):
    """||actual - expected||_inf / ||expected||_inf (or the absolute error where expected is 0)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def test_options_host_emulation(tmp_path, emulation_library):
    """forward_with_options and backward_with_options of the emulated CUDA engine against the CPU
    engine's: every output, saved tensor (same shapes and meaning: the Python side's fakes and
    autograd formula serve both) and gradient, for every cell x OPTIONS_VARIANTS x float64 /
    float32."""
    torch = pytest.importorskip("torch")
    emulated_file, reference_file = tmp_path / "emulated.pt", tmp_path / "cpu.pt"
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--emulate-options", str(emulation_library),
         str(emulated_file)],
        capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert result.returncode == 0, (
        f"emulated run failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    _run_cpu_reference("--reference-options", reference_file)
    emulated, expected = torch.load(str(emulated_file)), torch.load(str(reference_file))
    assert sorted(emulated) == sorted(expected)
    failures, compared = [], 0
    for key, values in expected.items():
        tol = OPTIONS_TOL[key.rsplit("/", 1)[1]]
        assert sorted(emulated[key]) == sorted(values), key
        for name, value in values.items():
            actual = emulated[key][name]
            if actual.shape != value.shape or actual.dtype != value.dtype:
                failures.append(f"{key} {name}: {actual.dtype}{tuple(actual.shape)} != "
                                f"{value.dtype}{tuple(value.shape)}")
                continue
            if value.numel() == 0:
                continue
            compared += 1
            err = _relative_error(actual, value)
            if not err <= tol:
                failures.append(f"{key} {name}: relative error {err:.3e} > {tol:.0e}")
    assert not failures, "\n".join(failures)
    # Every option's tensors were compared somewhere (not all of them empty).
    for name in OPTIONS_FORWARD + OPTIONS_GRADIENTS:
        assert any(values[name].numel() > 0 for values in expected.values() if name in values), name
    assert compared > 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--emulate":
        import torch

        torch.ops.load_library(sys.argv[2])
        _emulation_check_autocast()
        torch.save(_emulation_results(), sys.argv[3])
        sys.exit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "--emulate-options":
        import torch

        torch.ops.load_library(sys.argv[2])
        torch.save(_options_results(), sys.argv[3])
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-options":
        import torch

        sys.path.insert(0, ROOT)
        import rnnfast  # noqa: F401  (the CPU engine)

        torch.save(_options_results(), sys.argv[2])
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--reference":
        import torch

        sys.path.insert(0, ROOT)
        import rnnfast  # noqa: F401  (the CPU engine)

        torch.save({"results": _emulation_results(), "truth": _emulation_truth()}, sys.argv[2])
        sys.exit(0)
    sys.exit(pytest.main([__file__, "-v"]))
