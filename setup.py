"""Builds rnnfast and its compiled extension rnnfast._C.

The extension holds the op schemas and the CPU engine; when torch was built with CUDA and
nvcc is found, the CUDA engine (csrc/cuda) is compiled into it too. Build without build
isolation so the extension is compiled against the torch that is installed:

    pip install --no-build-isolation -e .      # or: pip install / pip wheel --no-build-isolation .

The objects are kept in build/temp, so a rebuild compiles only the sources that changed.
"""
import glob
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as missing_torch:
    # pip builds in an isolated environment by default, where the installed torch is not
    # importable; a torch fetched into it could differ from the one the extension must match.
    raise SystemExit(
        f"rnnfast: building the extension needs torch, which this Python cannot import "
        f"({missing_torch}). Install torch first (pip install torch), then build without build "
        "isolation so the extension is compiled against that torch:\n"
        "    pip install --no-build-isolation .        (or -e ., or pip wheel --no-build-isolation .)")

ROOT = os.path.dirname(os.path.abspath(__file__))


def source_hash(with_cuda):
    """The sources' fingerprint; `import rnnfast` compares it to spot a stale build."""
    spec = importlib.util.spec_from_file_location(
        "rnnfast_source_hash", os.path.join(ROOT, "rnnfast", "_source_hash.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(ROOT, with_cuda)


def relative_sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


X86_64 = platform.machine() in ("x86_64", "AMD64")


def cpu_capabilities():
    """The instruction sets the CPU engine's vector code is compiled for, as (name, flags): on
    x86-64 a portable copy, an AVX2 one and an AVX-512 one, of which the extension runs the best
    the CPU has (csrc/cpu/capability.h); elsewhere the portable copy only.
    RNNFAST_CPU_CAPABILITIES (e.g. "DEFAULT" or "DEFAULT,AVX512") builds fewer, in less time; the
    portable copy is always built."""
    copies = {"DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
    if X86_64:
        avx2 = ["-mavx2", "-mfma", "-mf16c"]
        copies["AVX2"] = avx2 + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        copies["AVX512"] = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                   "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    asked = os.environ.get("RNNFAST_CPU_CAPABILITIES")
    if asked is not None:
        names = {name.strip().upper() for name in asked.split(",") if name.strip()}
        unknown = names - set(copies)
        if unknown:
            raise SystemExit(f"rnnfast: RNNFAST_CPU_CAPABILITIES={asked!r} names {sorted(unknown)}; "
                             f"this machine builds {', '.join(copies)}")
        copies = {name: flags for name, flags in copies.items() if name == "DEFAULT" or name in names}
    return list(copies.items())


def links_shared_libstdcxx(compiler):
    """Whether `compiler` (a command line) finds a shared libstdc++. One that finds only
    libstdc++.a links a private copy into the extension, beside the one torch loads, and the
    two copies' locales disagree: formatting a number in an error message crashed."""
    try:
        found = subprocess.run(shlex.split(compiler) + ["-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True  # not a GCC-like driver: nothing to check
    return os.path.isabs(found)


def choose_cxx_compiler():
    """Keeps $CXX (or Python's configured C++ compiler) unless it would link libstdc++
    statically; then uses g++ or c++ from PATH, or stops with what to do."""
    if platform.system() != "Linux":
        return
    configured = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if links_shared_libstdcxx(configured):
        return
    for name in ("g++", "c++"):
        candidate = shutil.which(name)
        if candidate and links_shared_libstdcxx(candidate):
            print(f"rnnfast: the C++ compiler {configured!r} finds no shared libstdc++ (only "
                  f"libstdc++.a, which would put a second libstdc++ in the extension); building "
                  f"with {candidate} instead")
            # CXX compiles the sources and links the C++ extension; CC goes with it
            os.environ["CXX"] = candidate
            c_compiler = shutil.which("gcc" if name == "g++" else "cc")
            if c_compiler:
                os.environ["CC"] = c_compiler
            return
    raise SystemExit(
        f"rnnfast: the C++ compiler {configured!r} finds no shared libstdc++ (only libstdc++.a); "
        "an extension linked with it carries a second libstdc++ and crashes. Set CXX (and CC) "
        "to a compiler that links libstdc++ dynamically, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc")


choose_cxx_compiler()

CUDA_SOURCES = relative_sources("csrc/cuda/*.cu") + relative_sources("csrc/cuda/*.cpp")
# The CUDA engine is built when torch has CUDA and nvcc is found (RNNFAST_NO_CUDA=1: never).
WITH_CUDA = bool(
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("RNNFAST_NO_CUDA", "0") != "1"
    and CUDA_SOURCES
)


# The CPU engine's files compiled once per instruction set; csrc/cpu/register_ops.cpp, which
# registers the copy this CPU runs, is compiled once with the rest.
CPU_ENGINE_SOURCES = [source for source in relative_sources("csrc/cpu/*.cpp")
                      if os.path.basename(source) != "register_ops.cpp"]


def optimization_flag():
    """-O3, or the level RNNFAST_OPT_LEVEL names: 0 compiles the extension in about 60% of the
    time into code many times slower, for a debugger or a check that the sources build."""
    level = os.environ.get("RNNFAST_OPT_LEVEL", "3")
    if level not in ("0", "1", "2", "3"):
        raise SystemExit(f"rnnfast: RNNFAST_OPT_LEVEL={level!r}; it must be 0, 1, 2 or 3")
    return f"-O{level}"


def extension():
    sources = relative_sources("csrc/*.cpp") + ["csrc/cpu/register_ops.cpp"]
    # -fopenmp: at::parallel_for is a header template whose threads are an OpenMP pragma; built
    # without it, the CPU engine's parallel loops would run on one thread. The OpenMP runtime
    # linked is the libgomp.so.1 torch itself loads.
    # -g0: no debug information (Python's own flags ask for it), which takes 40% of the compile
    # time of the engine's template-heavy files and most of the binary's size;
    # RNNFAST_DEBUG_INFO=1 keeps it, for a debugger's source lines.
    debug_info = [] if os.environ.get("RNNFAST_DEBUG_INFO") == "1" else ["-g0"]
    optimize = optimization_flag()
    # RNNFAST_AVX2_ENGINE, RNNFAST_AVX512_ENGINE: the copies register_ops.cpp may choose.
    cxx_flags = [optimize, "-std=c++17", "-fopenmp"] + debug_info + [
        f"-DRNNFAST_{name}_ENGINE" for name, _ in cpu_capabilities() if name != "DEFAULT"]
    link_flags = ["-fopenmp"]
    if WITH_CUDA:
        # sm_80 and sm_90 unless the user names architectures.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "rnnfast._C",
            sources + CUDA_SOURCES,
            extra_compile_args={
                "cxx": cxx_flags + ["-DRNNFAST_WITH_CUDA"],
                "nvcc": [optimize, "-std=c++17", "-DRNNFAST_WITH_CUDA"],
            },
            extra_link_args=link_flags,
        )
    return CppExtension("rnnfast._C", sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags)


class BuildWithSourceHash(BuildExtension.with_options(use_ninja=True)):
    """Builds the extension, then records in rnnfast/_built_from.py which sources and which torch
    it was built from."""

    def finalize_options(self):
        super().finalize_options()
        # pip's editable install would compile into a fresh temporary folder every time; the
        # project's own folder keeps ninja's objects and dependency files between builds.
        self.build_temp = os.path.join(ROOT, "build", "temp")

    def build_extension(self, ext):
        # The CPU engine's copies, each in a folder of its own, go on the link line after the
        # baseline objects, in cpu_capabilities()' order: the linker keeps the first copy of a
        # function the objects share, so that copy is always one any x86-64 CPU runs.
        macros = ext.define_macros + [(name,) for name in ext.undef_macros]
        engine_objects = []
        for name, flags in cpu_capabilities():
            compile_args = dict(ext.extra_compile_args)
            compile_args["cxx"] = ext.extra_compile_args["cxx"] + flags
            engine_objects += self.compiler.compile(
                CPU_ENGINE_SOURCES, output_dir=os.path.join(self.build_temp, "cpu-" + name.lower()),
                macros=macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=compile_args, depends=ext.depends)
        ext.extra_objects = engine_objects
        super().build_extension(ext)

    def run(self):
        super().run()
        stamp = (f'"""Written by setup.py after a successful build."""\n'
                 f'SOURCE_HASH = "{source_hash(WITH_CUDA)}"\n'
                 f'TORCH_VERSION = "{torch.__version__}"\n')
        for folder in {os.path.join(ROOT, "rnnfast"), os.path.join(self.build_lib, "rnnfast")}:
            if os.path.isdir(folder):
                with open(os.path.join(folder, "_built_from.py"), "w") as out:
                    out.write(stamp)


setup(
    name="rnnfast",
    version="0.1.0",
    description="Fused LSTM, GRU and Elman layers for PyTorch: drop-in replacements for torch.nn",
    packages=find_packages(include=["rnnfast", "rnnfast.*"]),
    python_requires=">=3.9",
    # 2.9: the oldest torch whose headers the extension compiles against (at::vec::fnmadd).
    install_requires=["torch>=2.9", "numpy"],
    # Keep requirements.txt (what scripts/setup.sh installs) in step with these.
    extras_require={
        "tasks": ["tqdm", "matplotlib"],
        "test": ["pytest", "numpy", "ruff", "clang-format==18.1.8", "onnx", "onnxscript",
                 "onnxruntime"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithSourceHash},
    zip_safe=False,
)
