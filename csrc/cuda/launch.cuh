// How every kernel of the CUDA engine is launched: launch<Kernel>() is the one place that
// launches (or, in the host emulation build, runs on the host) a kernel, so the launchers
// (launchers.cuh) only say which kernel and with which shape.
//
// A Kernel is a struct (the step kernels' StepKernel, step_kernels.cuh; SequenceKernel,
// sequence_kernels.cuh) with
//   kMaxThreadsPerBlock                  its __launch_bounds__,
//   run_on_device(params...)             what each of its threads runs (nvcc only),
//   run_on_host(shape, params...)        the whole launch's work on the calling thread, for
//                                        the host emulation build.
// A plain C++ compiler (the host-emulation test build, see RNNFAST_CUDA_HOST_EMULATION in
// engine.cu) sees no kernel, only run_on_host; the extension that setup.py builds always compiles
// the launchers with nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace rnnfast {
namespace cuda {

// A launch: `blocks` blocks of `threads_per_block` threads, each block with `shared_bytes` of
// dynamic shared memory (0: none).
struct LaunchShape {
  int64_t blocks, threads_per_block, shared_bytes;
};

#if defined(__CUDACC__)
// The parameters are by value, as kernel parameters must be (a `const` on the pack would keep
// nvcc's host stub from converting to the kernel's function type).
template <typename Kernel, typename... Params>
__global__ void __launch_bounds__(Kernel::kMaxThreadsPerBlock) run_kernel(Params... params) {
  Kernel::run_on_device(params...);
}
#endif

// One launch of Kernel on `stream`, none when `shape` has no block. Shared memory beyond the
// default 48 KiB is opted into per launch, for the kernels that use dynamic shared memory. The
// caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK in engine.cu).
template <typename Kernel, typename... Params>
void launch(const LaunchShape& shape, cudaStream_t stream, const Params&... params) {
  if (shape.blocks <= 0) return;
#if defined(__CUDACC__)
  const auto kernel = run_kernel<Kernel, Params...>;
  if (shape.shared_bytes > 0 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shape.shared_bytes)) != cudaSuccess) {
    return;  // the error stays as the last error, for the caller's launch check
  }
  kernel<<<static_cast<unsigned int>(shape.blocks),
           static_cast<unsigned int>(shape.threads_per_block),
           static_cast<size_t>(shape.shared_bytes), stream>>>(params...);
#else
  (void)stream;
  Kernel::run_on_host(shape, params...);
#endif
}

// One cooperative launch of Kernel (cudaLaunchCooperativeKernel): all of its blocks are resident
// at once or the launch fails (cudaErrorCooperativeLaunchTooLarge, left for the caller's launch
// check), which the grid-wide barrier of the persistent kernels (persistent_kernels.cuh) needs.
// The host emulation runs Kernel::run_on_host, which runs the blocks barrier by barrier.
template <typename Kernel, typename... Params>
void launch_cooperative(const LaunchShape& shape, cudaStream_t stream, const Params&... params) {
  if (shape.blocks <= 0) return;
#if defined(__CUDACC__)
  const auto kernel = run_kernel<Kernel, Params...>;
  if (shape.shared_bytes > 0 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shape.shared_bytes)) != cudaSuccess) {
    return;
  }
  // The kernel's parameters by address, as cudaLaunchCooperativeKernel takes them.
  void* arguments[] = {const_cast<void*>(static_cast<const void*>(&params))...};
  cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                              dim3(static_cast<unsigned int>(shape.blocks)),
                              dim3(static_cast<unsigned int>(shape.threads_per_block)), arguments,
                              static_cast<size_t>(shape.shared_bytes), stream);
#else
  (void)stream;
  Kernel::run_on_host(shape, params...);
#endif
}

}  // namespace cuda
}  // namespace rnnfast
