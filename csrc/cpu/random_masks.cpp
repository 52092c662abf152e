// rnnfast::random_mask's CPU kernel (engine.h): the zoneout masks of the layers with cell options
// (rnnfast/functional.py), drawn from one seed that Python takes from torch's generator.
//
// torch.rand draws each element from torch's Mersenne Twister in turn, 2.4 ns an element here: a
// 16-row, 64-unit LSTM's [100, 16, 64] zoneout mask took a fifth of its training step. A
// counter-based generator decides each element from the seed and the element's index alone, so
// the threads fill their parts of the mask independently and a seed gives the same mask on any
// number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../buffer_pool.h"
#include "capability.h"
#include "kernels.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace {

// SplitMix64's output for the counter'th step of the sequence that starts at seed: 64 random
// bits (Steele, Lea and Flood 2014; its outputs over consecutive counters pass BigCrush).
inline uint64_t split_mix(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Pairs of elements per thread's share (each SplitMix64 output decides two elements), and per
// batch of outputs computed before they are written (a loop the compiler vectorises).
constexpr int64_t kPairsPerTask = 1 << 14;
constexpr int64_t kPairsPerBatch = 64;

// out[i] = 1 where the 32 bits of element i are below threshold, else 0: element 2k takes the
// low half of output k, element 2k + 1 its high half.
template <typename T>
void fill_mask(T* out, int64_t n, uint64_t seed, uint64_t threshold) {
  at::parallel_for(0, (n + 1) / 2, kPairsPerTask, [&](int64_t begin, int64_t end) {
    uint64_t bits[kPairsPerBatch];
    // The halves of `bits` in element order (little-endian: output k's low half first), as
    // one array, so that the comparisons run as vectors without lane shuffles.
    uint32_t halves[2 * kPairsPerBatch];
    for (int64_t first = begin; first < end; first += kPairsPerBatch) {
      const int64_t count = std::min(kPairsPerBatch, end - first);
      for (int64_t k = 0; k < count; ++k) bits[k] = split_mix(seed, uint64_t(first + k));
      for (int64_t k = 0; k < count; ++k) {
        halves[2 * k] = uint32_t(bits[k]);
        halves[2 * k + 1] = uint32_t(bits[k] >> 32);
      }
      const int64_t values = std::min(2 * count, n - 2 * first);
      T* to = out + 2 * first;
      for (int64_t i = 0; i < values; ++i) to[i] = T(uint64_t(halves[i]) < threshold ? 1 : 0);
    }
  });
}

}  // namespace

// A tensor of `size` and `dtype` whose elements are 1 with probability p, else 0, each
// independently, decided by seed (an int64 scalar) and the element's place alone.
at::Tensor random_mask_cpu(const at::Tensor& seed, at::IntArrayRef size, double p,
                           at::ScalarType dtype) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "rnnfast.random_mask: seed must be one int64 value, got a ", seed.scalar_type(),
              " tensor of ", seed.numel(), " elements");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "rnnfast.random_mask: p must be in [0, 1], got ", p);
  // (From the pool: a training step draws a mask of this size every call, and a fresh one costs
  // a page fault per page.)
  at::Tensor out = pooled_empty(size, at::TensorOptions().dtype(dtype));
  const uint64_t seed_bits = static_cast<uint64_t>(seed.item<int64_t>());
  // P(bits < threshold) = floor(p * 2^32) / 2^32 for 32 uniform bits: p to within 2^-32.
  const uint64_t threshold = static_cast<uint64_t>(p * 4294967296.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rnnfast_random_mask", [&] {
    fill_mask<scalar_t>(out.data_ptr<scalar_t>(), out.numel(), seed_bits, threshold);
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
