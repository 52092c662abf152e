// What the CUDA engine's host code (engine.cu, options_engine.cu) shares: the device guard, the
// current stream and the launch check of the build (a GPU build, or the host emulation that
// tests/test_cuda_compile.py builds with RNNFAST_CUDA_HOST_EMULATION, where the "device" is the
// CPU), autocast's exclusion inside the ops, and ATen's tensors as the kernels' pointers.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#ifndef RNNFAST_CUDA_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (at::cuda's is this one)
#endif

#include <cuda_runtime.h>

#include "types.cuh"

namespace rnnfast {

#ifndef RNNFAST_CUDA_HOST_EMULATION
// Sets the input's device as the current one for the op (a CPU input is refused by the
// argument checks that follow).
using DeviceGuard = c10::cuda::OptionalCUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#define RNNFAST_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#else
struct DeviceGuard {
  void set_device(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#define RNNFAST_KERNEL_LAUNCH_CHECK() ((void)0)
#endif

// The ATen calls inside the ops (GEMMs, sums) must run in the op's dtype even when the op is
// called under autocast (e.g. the backward op during a backward pass inside an autocast
// region): autocast is off for the duration of each op.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

// ATen's scalar type -> the kernels' storage type (same size and bits).
template <typename scalar_t>
struct KernelTypeOf {
  using type = scalar_t;
};
template <>
struct KernelTypeOf<at::Half> {
  using type = cuda::Half;
};
template <>
struct KernelTypeOf<at::BFloat16> {
  using type = cuda::BFloat16;
};
template <typename scalar_t>
using KernelType = typename KernelTypeOf<scalar_t>::type;

// The data of `t` as the kernels' type; nullptr for an undefined or empty tensor.
template <typename scalar_t>
KernelType<scalar_t>* data_of(const at::Tensor& t) {
  static_assert(sizeof(KernelType<scalar_t>) == sizeof(scalar_t), "same storage size");
  if (!t.defined() || t.numel() == 0) return nullptr;
  return reinterpret_cast<KernelType<scalar_t>*>(t.data_ptr<scalar_t>());
}

}  // namespace rnnfast
