// The forward's recurrent product packed by gate panels, for a product finished in registers.
//
// hg = h W_hh^T + b [B, gates * H] is computed here in tiles of `Rows` batch rows by one
// vector of hidden units j .. j + lanes - 1 of EVERY gate (LSTM: i, f, g, o): the tile holds
// all the pre-activations the cell math of those units needs, so the engine runs the cell on
// them while they are still in the L1 cache, and the threads split the hidden units (a panel
// each) for the whole sequence, never the gates of one unit.
//
// A panel is W_hh's rows of the tile's units, packed [K][gates][lanes] (zeros past the last
// hidden unit): per term k, `gates` vector loads feed Rows x gates fused multiply-adds, with
// the accumulators in vector registers for the whole k loop (oneDNN's and BLIS's register
// blocking, with the gates of a unit side by side).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <utility>

#include "capability.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

template <typename T>
class GatePanels {
 public:
  using V = at::vec::Vectorized<T>;
  static constexpr int kLanes = V::size();
  // Accumulator registers a tile may take: 32 vector registers with AVX-512 (16 with AVX2),
  // the rest left for the panel's vectors and the broadcast of h.
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int kAccumulators = 24;
#else
  static constexpr int kAccumulators = 12;
#endif
  // Batch rows of a full tile for a cell of `gates` gates (LSTM 6, GRU 8, Elman 12 with
  // AVX-512).
  static constexpr int rows_per_tile(int gates) {
    return std::min(kAccumulators / gates, kMaxRows);
  }
  static constexpr int kMaxRows = 12;

  // w_hh: [gates * H, K] contiguous; bias: [gates * H] contiguous or undefined. Allocates the
  // panels; pack() fills them (each thread its own, so they start in its cache).
  GatePanels(const at::Tensor& w_hh, const at::Tensor& bias, int64_t gates)
      : w_hh_tensor_(w_hh),
        w_hh_(w_hh.template data_ptr<T>()),
        bias_(bias.defined() ? bias.template data_ptr<T>() : nullptr),
        gates_(gates),
        hidden_(w_hh.size(0) / gates),
        k_(w_hh.size(1)),
        blocks_((hidden_ + kLanes - 1) / kLanes) {
    storage_ = at::empty({blocks_ * panel_size()}, w_hh.options());
    biases_ = at::empty({blocks_ * gates_ * kLanes}, w_hh.options());
    panels_data_ = storage_.template data_ptr<T>();
    biases_data_ = biases_.template data_ptr<T>();
  }

  int64_t blocks() const { return blocks_; }
  // Hidden units of block `block`: first_unit(block) .. + units(block) - 1.
  int64_t first_unit(int64_t block) const { return block * kLanes; }
  int units(int64_t block) const {
    return static_cast<int>(std::min<int64_t>(kLanes, hidden_ - block * kLanes));
  }

  // Terms of a block that pack() transposes at a time: a cache line of each row of W_hh.
  static constexpr int64_t kPackTerms = 64 / int64_t(sizeof(T));

  // Packs blocks [first, end): panel [K][gates][lanes] and bias [gates][lanes] of each.
  void pack(int64_t first, int64_t end) {
    for (int64_t block = first; block < end; ++block) {
      T* panel = panel_of(block);
      T* bias = bias_of(block);
      const int64_t unit0 = first_unit(block);
      const int count = units(block);
      for (int64_t gate = 0; gate < gates_; ++gate) {
        for (int lane = 0; lane < kLanes; ++lane) {
          bias[gate * kLanes + lane] =
              bias_ && lane < count ? bias_[gate * hidden_ + unit0 + lane] : T(0);
        }
      }
      // A transpose of the block's rows of W_hh (one per unit and gate), a few terms at a time
      // so that the panel's rows being written stay in the L1 cache while every unit and gate
      // writes its lane (written term by term over the whole panel, each value's store missed
      // the cache). The padding lanes are zeros: a partial block computes nothing undefined.
      const int64_t stride = gates_ * kLanes;
      for (int64_t k0 = 0; k0 < k_; k0 += kPackTerms) {
        const int64_t k1 = std::min(k_, k0 + kPackTerms);
        for (int64_t gate = 0; gate < gates_; ++gate) {
          for (int lane = 0; lane < kLanes; ++lane) {
            T* to = panel + gate * kLanes + lane;
            if (lane < count) {
              const T* from = w_hh_ + (gate * hidden_ + unit0 + lane) * k_;
              for (int64_t k = k0; k < k1; ++k) to[k * stride] = from[k];
            } else {
              for (int64_t k = k0; k < k1; ++k) to[k * stride] = T(0);
            }
          }
        }
      }
    }
  }

  // Terms per chunk of the k loop: a chunk of a panel (kChunkBytes) stays in the L1 cache
  // while every row tile of a step runs on it, and h's rows of the chunk with it.
  // (32 KiB: of 16, 32 and 64 KiB and whole panels, the fastest over 15-60 rows and
  // 256-1024 units of LSTM on a Xeon.)
  static constexpr int64_t kChunkBytes = 32 << 10;
  int64_t chunk_terms() const {
    return std::max<int64_t>(1, kChunkBytes / (gates_ * kLanes * int64_t(sizeof(T))));
  }
  int64_t terms() const { return k_; }

  // hg[r * hg_stride + gate * H + j] for the `rows` rows from h (row stride K; nullptr: zero
  // states) and the units j of `block`, of every gate: bias + the terms k0 .. k1 - 1 of the
  // product where k0 == 0, else hg + those terms. rows <= rows_per_tile(gates).
  // fetch_ahead: for the first row tile of a chunk, which meets the chunk's panel before the
  // others (they find it in the L1 cache): fetch the panel a few terms ahead of the loop. A
  // thread's panels outgrow its L2 cache from a few hundred units, and the hardware's
  // prefetchers left the loop waiting on the L3 cache (20 rows of 640 LSTM units: 80 -> 100
  // GFLOP/s on one core).
  template <int Gates>
  void tile(const T* h, int rows, int64_t block, int64_t k0, int64_t k1, T* hg, int64_t hg_stride,
            bool fetch_ahead) const {
    dispatch_rows<Gates>(rows, [&](auto rows_constant) {
      constexpr int kTileRows = decltype(rows_constant)::value;
      if (fetch_ahead) {
        run_tile<kTileRows, Gates, true>(h, block, k0, k1, hg, hg_stride);
      } else {
        run_tile<kTileRows, Gates, false>(h, block, k0, k1, hg, hg_stride);
      }
    });
  }

 private:
  int64_t panel_size() const { return k_ * gates_ * kLanes; }
  T* panel_of(int64_t block) const { return panels_data_ + block * panel_size(); }
  T* bias_of(int64_t block) const { return biases_data_ + block * gates_ * kLanes; }

  // fn(std::integral_constant<int, rows>) for rows in 1 .. rows_per_tile(Gates).
  template <int Gates, int Rows = 1, typename Fn>
  static void dispatch_rows(int rows, Fn&& fn) {
    if constexpr (Rows < rows_per_tile(Gates)) {
      if (rows != Rows) {
        dispatch_rows<Gates, Rows + 1>(rows, std::forward<Fn>(fn));
        return;
      }
    }
    fn(std::integral_constant<int, Rows>());
  }

  // Terms ahead of the loop that fetch_ahead fetches (8 to 64 measured the same).
  static constexpr int64_t kFetchAheadTerms = 8;

  // Not inlined: inlined into the engine's step loop, GCC kept the accumulators in memory
  // as well as in registers, a store of each per term (half the rate of this kernel alone).
  template <int Rows, int Gates, bool FetchAhead>
  __attribute__((noinline)) void run_tile(const T* h, int64_t block, int64_t k0, int64_t k1, T* hg,
                                          int64_t hg_stride) const {
    const int64_t unit0 = first_unit(block);
    const int count = units(block);
    T* out = hg + unit0;
    V acc[Rows][Gates];
    if (k0 == 0) {
      const T* bias = biases_data_ + block * gates_ * kLanes;
      for (int g = 0; g < Gates; ++g) {
        const V start = V::loadu(bias + g * kLanes);
        for (int r = 0; r < Rows; ++r) acc[r][g] = start;
      }
    } else {
      for (int r = 0; r < Rows; ++r) {
        for (int g = 0; g < Gates; ++g) {
          acc[r][g] = V::loadu(out + r * hg_stride + g * hidden_, count);
        }
      }
    }
    if (h != nullptr) {
      const T* panel = panels_data_ + block * panel_size();
      const int64_t K = k_;
      for (int64_t k = k0; k < k1; ++k) {
        if constexpr (FetchAhead) {
          // Past the last panel this touches nothing: a prefetch never faults.
          const T* ahead = panel + (k + kFetchAheadTerms) * Gates * kLanes;
          for (int g = 0; g < Gates; ++g) __builtin_prefetch(ahead + g * kLanes, 0, 3);
        }
        V w[Gates];
        for (int g = 0; g < Gates; ++g) w[g] = V::loadu(panel + (k * Gates + g) * kLanes);
        for (int r = 0; r < Rows; ++r) {
          const V x(h[r * K + k]);
          for (int g = 0; g < Gates; ++g) acc[r][g] = at::vec::fmadd(x, w[g], acc[r][g]);
        }
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int g = 0; g < Gates; ++g) acc[r][g].store(out + r * hg_stride + g * hidden_, count);
    }
  }

  at::Tensor w_hh_tensor_;  // keeps w_hh_'s memory (a contiguous copy may be the only owner)
  const T* w_hh_;
  const T* bias_;
  int64_t gates_, hidden_, k_, blocks_;
  at::Tensor storage_;  // [blocks][K][gates][lanes]
  at::Tensor biases_;   // [blocks][gates][lanes]
  T* panels_data_;
  T* biases_data_;
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
