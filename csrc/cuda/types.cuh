// The CUDA engine's storage and accumulation types, shared by its kernels and its host code.
//
// Storage types T: float, double, and rnnfast::cuda::Half / BFloat16 (two bytes each, the bit
// layout of at::Half / at::BFloat16, so engine.cu passes ATen's data pointers reinterpreted).
// Accumulation type A = AccType<T>: double for double, float otherwise (at::opmath_type's).
//
// Like every header of csrc/cuda but engine.cu, this one includes no torch header, so that nvcc
// alone compiles (and tests/test_cuda_compile.py compile-checks) the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../cells.h"

namespace rnnfast {
namespace cuda {

// Two-byte float storage with explicit conversions through the CUDA intrinsics, which exist
// whatever __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ say (torch's
// extension build defines them, which removes __half's own conversion operators).
struct alignas(2) Half {
  unsigned short bits;
  Half() = default;
  __host__ __device__ __forceinline__ explicit Half(float value)
      : bits(__half_as_ushort(__float2half_rn(value))) {}
  __host__ __device__ __forceinline__ explicit operator float() const {
    return __half2float(__ushort_as_half(bits));
  }
};

struct alignas(2) BFloat16 {
  unsigned short bits;
  BFloat16() = default;
  __host__ __device__ __forceinline__ explicit BFloat16(float value)
      : bits(__bfloat16_as_ushort(__float2bfloat16_rn(value))) {}
  __host__ __device__ __forceinline__ explicit operator float() const {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
};

static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "two-byte storage types");

template <typename T>
struct AccTypeOf {
  using type = float;
};
template <>
struct AccTypeOf<double> {
  using type = double;
};
template <typename T>
using AccType = typename AccTypeOf<T>::type;

}  // namespace cuda
}  // namespace rnnfast
