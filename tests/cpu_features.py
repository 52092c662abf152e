"""What the CPU under the tests has, where a test's path depends on it."""
import rnnfast


def runs_bf16_dot_products():
    """Whether the AVX-512 engine runs here on a CPU with AVX512-BF16's dot products, which run
    the bfloat16 per-step products where AMX's tiles do not, and on which ATen's bfloat16 GEMM
    runs (Linux's CPU flags)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return rnnfast.cpu_capability() == "AVX512" and "avx512_bf16" in flags
