"""The ways the CUDA engine runs a layer's time loop, and the environment that selects each:
one sequence kernel where W_hh fits in a block's shared memory (the default), the GEMM-per-step
loop (RNNFAST_SEQUENCE_KERNELS=0), the persistent kernels of many blocks (opt-in:
RNNFAST_CUDA_PERSISTENT=1) or a warp per batch row (opt-in: RNNFAST_CUDA_WARP_KERNELS=1).
tests/test_cuda.py runs each on a GPU, tests/test_cuda_compile.py each in the host emulation."""

ENGINE_PATHS = {
    "sequence": dict(RNNFAST_SEQUENCE_KERNELS="1", RNNFAST_CUDA_PERSISTENT="0",
                     RNNFAST_CUDA_WARP_KERNELS="0"),
    "per_step": dict(RNNFAST_SEQUENCE_KERNELS="0", RNNFAST_CUDA_PERSISTENT="0",
                     RNNFAST_CUDA_WARP_KERNELS="0"),
    "persistent": dict(RNNFAST_SEQUENCE_KERNELS="1", RNNFAST_CUDA_PERSISTENT="1",
                       RNNFAST_CUDA_WARP_KERNELS="0"),
    "warp": dict(RNNFAST_SEQUENCE_KERNELS="1", RNNFAST_CUDA_PERSISTENT="0",
                 RNNFAST_CUDA_WARP_KERNELS="1"),
}
