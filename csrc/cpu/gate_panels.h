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
//
// Where the registers hold fewer than 4 rows of every gate (the LSTM with AVX2: 3 rows x 4
// gates), a batch of fewer than 9 rows runs in tiles of 3, and the rows left over go into a
// tile of 4 or 5 rows that runs its gates in two passes of half of them (5 rows x 2 gates,
// twice), not into a tile of 2 rows x 4 gates, whose 8 accumulators leave the multiply-adds
// waiting on each other: it ran at 60% of the rate of a tile of 3. From 9 rows every tile runs
// in two passes, as even as tiles of at most 6 rows allow (16 rows as 5 + 5 + 6): a tile reads
// each term's panel vectors once for its rows, half as often per row as a tile of 3. (On a
// 2-core AMD EPYC of the Zen 3 generation, LSTM forward under no_grad, 1 thread: 9 rows x 100
// steps of 256 units 20.0 -> 16.6 ms, 12 rows 29.1 -> 19.5, 16 rows 25.8 -> 23.3, 16 rows of 512
// units 113 -> 94; 2 threads, 16 rows of 256 and 512 units 13.5 -> 12.0 and 64.7 -> 50.9 ms. A
// tile of 6 rows in two passes ran 6 rows of 512 units slower than two tiles of 3, 41.7 against
// 35.9 ms; 7 and 8 rows measured the same either way. Double's tiles, of 4 lanes, take the same
// shapes, not measured.)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "blas.h"
#include "capability.h"
#include "recurrent_product.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// to[c * to_stride + r] = from[r * from_stride + c] for r, c in 0 .. 7.
inline void transpose_8x8(const float* from, int64_t from_stride, float* to, int64_t to_stride) {
  __m256 rows[8], pairs[8];
  for (int r = 0; r < 8; ++r) rows[r] = _mm256_loadu_ps(from + r * from_stride);
  // Per 128-bit half, rows a, b -> (a0 b0 a1 b1) and (a2 b2 a3 b3).
  for (int r = 0; r < 8; r += 2) {
    pairs[r] = _mm256_unpacklo_ps(rows[r], rows[r + 1]);
    pairs[r + 1] = _mm256_unpackhi_ps(rows[r], rows[r + 1]);
  }
  // Per half, rows a .. d -> (a0 b0 c0 d0), (a1 b1 c1 d1), (a2 ...), (a3 ...): rows[0 .. 3]
  // hold columns 0 .. 3 of rows 0 .. 3 (low half) and columns 4 .. 7 (high half), rows[4 .. 7]
  // the same of rows 4 .. 7.
  for (int r = 0; r < 8; r += 4) {
    rows[r] = _mm256_shuffle_ps(pairs[r], pairs[r + 2], 0x44);
    rows[r + 1] = _mm256_shuffle_ps(pairs[r], pairs[r + 2], 0xEE);
    rows[r + 2] = _mm256_shuffle_ps(pairs[r + 1], pairs[r + 3], 0x44);
    rows[r + 3] = _mm256_shuffle_ps(pairs[r + 1], pairs[r + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(to + c * to_stride, _mm256_permute2f128_ps(rows[c], rows[c + 4], 0x20));
    _mm256_storeu_ps(to + (c + 4) * to_stride, _mm256_permute2f128_ps(rows[c], rows[c + 4], 0x31));
  }
}
#endif

#if defined(__x86_64__) || defined(_M_X64)
// Whether CPUID names this CPU's vendor `vendor` ("GenuineIntel", "AuthenticAMD"): its 12
// characters in ebx, edx and ecx.
inline bool cpu_vendor_is(const char (&vendor)[13]) {
  unsigned int eax = 0, name[3] = {0, 0, 0};
  return __get_cpuid(0, &eax, &name[0], &name[2], &name[1]) &&
         std::memcmp(name, vendor, sizeof(name)) == 0;
}
#endif

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
  static constexpr int kMaxRows = 12;
  // Batch rows of a tile that computes every gate in one pass, for a cell of `gates` gates
  // (AVX-512: LSTM 6, GRU 8, Elman 12; AVX2: LSTM 3, GRU 4, Elman 12).
  static constexpr int rows_per_tile(int gates) {
    return std::min(kAccumulators / gates, kMaxRows);
  }
  // Whether a cell's tiles of more rows run their gates in two passes (the LSTM with AVX2).
  static constexpr bool splits_gates(int gates) {
    return rows_per_tile(gates) == 3 && gates % 2 == 0;
  }
  // The most rows of a tile that runs its gates in two passes, and the batch from which every
  // tile does (the note at the top of this file).
  static constexpr int kMaxSplitTileRows = 6;
  static constexpr int64_t kSplitTilesMinRows = 9;
  static constexpr int max_tile_rows(int gates) {
    return splits_gates(gates) ? kMaxSplitTileRows : rows_per_tile(gates);
  }
  // Independent multiply-add chains that keep the FMA units busy (2 units of 4 cycles' latency
  // on Zen 3 and Skylake-X alike). A tile of fewer accumulators (one row: a batch of 1, or the
  // last rows of a packed sequence) splits its terms over this many interleaved partial sums
  // each, added at the end: a single row of Elman units ran one multiply-add per 4 cycles.
  static constexpr int kMinChains = 8;
  static constexpr int term_splits(int accumulators) {
    return accumulators >= kMinChains ? 1
                                      : std::min(kAccumulators / accumulators,
                                                 (kMinChains + accumulators - 1) / accumulators);
  }

  // A step's `rows` batch rows in tiles: `firsts` tiles of `first_rows` rows, then tiles of
  // `rest_rows` rows; tile i is rows begin(i) .. begin(i + 1) - 1.
  struct RowTiles {
    int64_t count, firsts, first_rows, rest_rows;
    int64_t begin(int64_t tile) const {
      return tile <= firsts ? tile * first_rows : firsts * first_rows + (tile - firsts) * rest_rows;
    }
  };
  template <int Gates>
  static RowTiles row_tiles(int64_t rows) {
    constexpr int64_t kFull = rows_per_tile(Gates);
    if constexpr (splits_gates(Gates)) {
      if (rows >= kSplitTilesMinRows) return even_tiles(rows, kMaxSplitTileRows);
      // Tiles of 3, and the 1 or 2 rows left over: 2 as one tile of 5 (3 + 2); 1 as one of 4.
      const int64_t threes = rows / kFull, left = rows % kFull;
      if (left == 0 || threes == 0) return {threes + (left > 0), threes, kFull, left};
      if (left == 2) return {threes, threes - 1, kFull, kFull + 2};
      return {threes, threes - 1, kFull, kFull + 1};
    } else {
      // As even as kFull allows: 20 AVX-512 LSTM rows as 4 tiles of 5, not 6 + 6 + 6 + 2.
      return even_tiles(rows, kFull);
    }
  }
  // `rows` rows in as few tiles of at most `most` rows as they take, as even as they allow.
  static RowTiles even_tiles(int64_t rows, int64_t most) {
    const int64_t count = (rows + most - 1) / most;
    if (count == 0) return {0, 0, 0, 0};
    return {count, count - rows % count, rows / count, rows / count + 1};
  }

  // How the matrix comes: [gates * H, K] (its rows, as W_hh for h W_hh^T), or its transpose
  // [K, gates * H] (W_hh [G, P] for the backward's dgates W_hh: panels of W_hh^T's rows, packed
  // from W_hh as it is, where a transposed copy made the backward's peak memory W_hh larger).
  enum class Layout { Rows, Transposed };

  // w_hh: contiguous, in `layout`; bias: [gates * H] contiguous or undefined. Allocates the
  // panels; pack() fills them (each thread its own, so they start in its cache).
  // w_ih: [gates * H, I] contiguous, or undefined; Layout::Rows only. Where defined, the panels
  // hold the rows of [W_ih | W_hh]: terms 0 .. I - 1 from W_ih, then W_hh's, so that a tile
  // computes x W_ih^T + h W_hh^T + bias from the rows of both (the forward's projection of the
  // input in its steps, forward.cpp).
  GatePanels(const at::Tensor& w_hh, const at::Tensor& bias, int64_t gates,
             Layout layout = Layout::Rows, const at::Tensor& w_ih = at::Tensor())
      : w_hh_tensor_(w_hh),
        w_ih_tensor_(w_ih),
        w_hh_(w_hh.template data_ptr<T>()),
        w_ih_(w_ih.defined() ? w_ih.template data_ptr<T>() : nullptr),
        bias_(bias.defined() ? bias.template data_ptr<T>() : nullptr),
        transposed_(layout == Layout::Transposed),
        gates_(gates),
        hidden_(w_hh.size(transposed_ ? 1 : 0) / gates),
        input_terms_(w_ih.defined() ? w_ih.size(1) : 0),
        k_(w_hh.size(transposed_ ? 0 : 1) + input_terms_),
        blocks_((hidden_ + kLanes - 1) / kLanes),
        chunk_terms_(std::max<int64_t>(1, chunk_bytes() / (gates * kLanes * int64_t(sizeof(T))))) {
    TORCH_INTERNAL_ASSERT(!w_ih.defined() || layout == Layout::Rows);
    storage_ = at::empty({blocks_ * panel_size()}, w_hh.options());
    outgrows_core_cache_ = storage_.nbytes() > static_cast<size_t>(core_cache_bytes());
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

  // The index-th block that a thread running blocks [first, end) takes at a step: in order at
  // even steps, in reverse at odd ones. A thread's panels over a few hundred units outgrow its
  // L2 cache, and in one order every step evicted each panel before its next use; this way a
  // step starts on the panels the last step used last, still in the L2 cache (on a 2-core
  // Xeon, one row of 512 LSTM units: the forward of 100 steps 4.5-4.9 -> 3.7-4.0 ms; 4 rows
  // 9-13% faster, 16 and 20 rows the same). A row's sums run in the same order either way.
  static int64_t block_at(int64_t first, int64_t end, int64_t index, int64_t step) {
    return step % 2 == 0 ? first + index : end - 1 - index;
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
      if (transposed_) {
        // The block's lanes of each gate are contiguous in each row of W^T: a copy per term.
        for (int64_t k = 0; k < k_; ++k) {
          for (int64_t gate = 0; gate < gates_; ++gate) {
            const T* from = w_hh_ + k * gates_ * hidden_ + gate * hidden_ + unit0;
            T* to = panel + (k * gates_ + gate) * kLanes;
            std::copy(from, from + count, to);
            std::fill(to + count, to + kLanes, T(0));
          }
        }
        continue;
      }
      if (w_ih_) pack_rows(w_ih_, input_terms_, 0, panel, unit0, count);
      pack_rows(w_hh_, k_ - input_terms_, input_terms_, panel, unit0, count);
    }
  }

  // Packs every block, the blocks split over the threads as product() splits them.
  void pack_all() {
    at::parallel_for(0, blocks_, 1, [&](int64_t first, int64_t end) { pack(first, end); });
  }

  // Terms of a panel that a row tile fetches into the L2 cache while it runs (NextChunk).
  struct NextChunk {
    const T* terms = nullptr;  // the first term's gate vectors
    int64_t count = 0;
  };

  // What row tile `tile` of `tiles` fetches while it runs the chunk of `block` that ends at term
  // k1: a share of the next chunk (the rest of the block's panel, else the first chunk of
  // `next_block`, or nothing where next_block < 0), for each tile after the first, where the
  // panels outgrow a core's L2 cache. Those panels come from the L3 cache, and the first tile of
  // a chunk, fetching a few terms ahead of itself alone (fetch_ahead), waited on them; the tiles
  // after it run from the L1 cache and leave the memory idle, so they fetch the next chunk,
  // spread over their k loops. (In one process, interleaved, on a Xeon: 1 thread, the forward
  // of 16 rows x 100 steps of 512 LSTM units 2.7% faster, the 650-unit word model's LSTM
  // forward 6.6% and training step 3%, its GRU's 5.8% and 5%; 2 threads, the 650-unit LSTM
  // word model's forward -1% and 2.4% in two runs, training 0.5-2%. Panels within the L2 cache,
  // 16 rows of 256 LSTM units, moved from 4% slower to 6% faster: not fetched. A chunk's only
  // tile fetching its own next chunk ran 3-27% slower, 1 and 4 rows of 512 units: not done.)
  NextChunk next_chunk(int64_t block, int64_t k1, int64_t next_block, int64_t tile,
                       int64_t tiles) const {
    if (tile == 0 || !outgrows_core_cache_) return {};
    const T* first = nullptr;
    int64_t terms = 0;
    if (k1 < k_) {
      first = panel_of(block) + k1 * gates_ * kLanes;
      terms = std::min(chunk_terms(), k_ - k1);
    } else if (next_block >= 0) {
      first = panel_of(next_block);
      terms = std::min(chunk_terms(), k_);
    }
    const int64_t share = (terms + tiles - 2) / (tiles - 1);
    const int64_t begin = std::min(terms, (tile - 1) * share);
    return {first + begin * gates_ * kLanes, std::min(share, terms - begin)};
  }

  // out [rows, gates * H] (row stride out_stride) = h [rows, K] W^T + bias, the blocks split
  // over the threads: a product per step outside the forward's panel schedule (the options
  // engine's forward, the engine's backward), which sees its whole output at once.
  // step: the call's step, which orders each thread's blocks (block_at). split_terms: whether
  // tiles of few rows split their terms over partial sums (term_splits). Without, a row's sums
  // are in the same order in a tile of any shape, so a thread that runs a share of a batch
  // (rows per thread) computes each row exactly as one thread that runs the whole batch.
  template <int Gates>
  void product(const T* h, int64_t rows, T* out, int64_t out_stride, int64_t step,
               bool split_terms = true) const {
    const RowTiles tiles = row_tiles<Gates>(rows);
    const int64_t chunk = chunk_terms();
    at::parallel_for(0, blocks_, 1, [&](int64_t first, int64_t end) {
      for (int64_t index = 0; index < end - first; ++index) {
        const int64_t block = block_at(first, end, index, step);
        const int64_t next_block =
            index + 1 < end - first ? block_at(first, end, index + 1, step) : -1;
        for (int64_t k0 = 0; k0 < k_; k0 += chunk) {
          const int64_t k1 = std::min(k_, k0 + chunk);
          for (int64_t t = 0; t < tiles.count; ++t) {
            const int64_t r0 = tiles.begin(t), r1 = tiles.begin(t + 1);
            const int count = static_cast<int>(r1 - r0);
            T* tile_out = out + r0 * out_stride;
            const T* tile_h = h ? h + r0 * k_ + k0 : nullptr;
            const NextChunk next = next_chunk(block, k1, next_block, t, tiles.count);
            if (split_terms) {
              tile<Gates>(tile_h, k_, count, block, k0, k1, tile_out, out_stride, t == 0, next);
            } else {
              tile<Gates, false>(tile_h, k_, count, block, k0, k1, tile_out, out_stride, t == 0,
                                 next);
            }
          }
        }
      }
    });
  }

  // Terms per chunk of the k loop: a chunk of a panel (chunk_bytes) stays in the L1 cache
  // while every row tile of a step runs on it, and h's rows of the chunk with it.
  // (32 KiB: of 16, 32 and 64 KiB and whole panels, the fastest over 15-60 rows and
  // 256-1024 units of LSTM on a Xeon.)
  static constexpr int64_t kChunkBytes = 32 << 10;
  // On an AMD CPU with AVX-512 (Zen 4, whose L1 cache holds 32 KiB) chunks of 64 KiB, which
  // spill into the L2 cache: each chunk stores and reloads its tiles' accumulators, and there
  // fewer chunks ran faster than chunks that stay in the L1 cache. (2-core Zen 4 EPYC, in one
  // process, LSTM forward under no_grad, 2 threads: 16 rows x 100 steps of 256 units 9.25 ->
  // 8.80 ms, of 512 units 40.6 -> 38.9, 64 rows of 512 146 -> 139, the 650-unit word model's
  // two layers 58.6 -> 55.6; 16 and 8 KiB 13-40% slower; training steps 2-3% faster, the GRU's
  // forward the same; 1 thread, 16 rows of 512 units 70.3 -> 67.5 ms. Zen 3, which runs the
  // AVX2 copy, was not measured.)
  static constexpr int64_t kSpillingChunkBytes = 64 << 10;
  static int64_t chunk_bytes() {
#if defined(CPU_CAPABILITY_AVX512) && (defined(__x86_64__) || defined(_M_X64))
    static const bool amd = cpu_vendor_is("AuthenticAMD");
    if (amd) return kSpillingChunkBytes;
#endif
    return kChunkBytes;
  }
  int64_t chunk_terms() const { return chunk_terms_; }
  int64_t terms() const { return k_; }

  // hg[r * hg_stride + gate * H + j] for the `rows` rows of h and the units j of `block`, of
  // every gate: bias + the terms k0 .. k1 - 1 of the product where k0 == 0, else hg + those
  // terms. h: row r's terms k0 .. k1 - 1 at h + r * h_stride; nullptr: zeros (where k0 == 0,
  // the bias alone). rows <= max_tile_rows(gates).
  // fetch_ahead: for the first row tile of a chunk, which meets the chunk's panel before the
  // others (they find it in the L1 cache): fetch the panel a few terms ahead of the loop. A
  // thread's panels outgrow its L2 cache from a few hundred units, and the hardware's
  // prefetchers left the loop waiting on the L3 cache (20 rows of 640 LSTM units: 80 -> 100
  // GFLOP/s on one core). next: terms of a later chunk to fetch into the L2 cache while the tile
  // runs (next_chunk). SplitTerms: as product()'s split_terms.
  template <int Gates, bool SplitTerms = true>
  void tile(const T* h, int64_t h_stride, int rows, int64_t block, int64_t k0, int64_t k1, T* hg,
            int64_t hg_stride, bool fetch_ahead, NextChunk next = {}) const {
    dispatch_rows<Gates>(rows, [&](auto rows_constant) {
      constexpr int kTileRows = decltype(rows_constant)::value;
      constexpr int kPassGates = kTileRows > rows_per_tile(Gates) ? Gates / 2 : Gates;
      constexpr int kSplits = SplitTerms ? term_splits(kTileRows * kPassGates) : 1;
      for (int first_gate = 0; first_gate < Gates; first_gate += kPassGates) {
        // The first pass fetches ahead; the next finds the chunk in the L1 cache.
        if (fetch_ahead && first_gate == 0) {
          run_tile<kTileRows, Gates, kPassGates, kSplits, true>(h, h_stride, block, first_gate, k0,
                                                                k1, hg, hg_stride);
        } else if (next.count > 0 && first_gate == 0) {
          run_tile<kTileRows, Gates, kPassGates, kSplits, false, true>(
              h, h_stride, block, first_gate, k0, k1, hg, hg_stride, next);
        } else {
          run_tile<kTileRows, Gates, kPassGates, kSplits, false>(h, h_stride, block, first_gate, k0,
                                                                 k1, hg, hg_stride);
        }
      }
    });
  }

 private:
  int64_t panel_size() const { return k_ * gates_ * kLanes; }
  T* panel_of(int64_t block) const { return panels_data_ + block * panel_size(); }
  T* bias_of(int64_t block) const { return biases_data_ + block * gates_ * kLanes; }

  // Packs the block's rows of w [gates * H, terms] (units unit0 .. unit0 + count - 1 of each
  // gate) as the panel's terms first_term .. first_term + terms - 1.
  void pack_rows(const T* w, int64_t terms, int64_t first_term, T* panel, int64_t unit0,
                 int count) const {
    // A transpose of the block's rows of w (one per unit and gate), a few terms at a time
    // so that the panel's rows being written stay in the L1 cache while every unit and gate
    // writes its lane (written term by term over the whole panel, each value's store missed
    // the cache). The padding lanes are zeros: a partial block computes nothing undefined.
    // In float, full blocks move squares of 8 units x 8 terms through vector registers. Value
    // by value, the loads from the block's gates x kLanes rows of w kept few cache misses
    // in flight: the packing took 5% of a forward of 10 steps (the seq2seq encoder; on a
    // 2-core AMD EPYC that forward runs 6% faster in squares, the word models' 2-3%, 100
    // steps of 512 units 1.6%).
    const int64_t stride = gates_ * kLanes;
    for (int64_t k0 = 0; k0 < terms; k0 += kPackTerms) {
      const int64_t k1 = std::min(terms, k0 + kPackTerms);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<T, float>) {
        if (count == kLanes && k1 - k0 == kPackTerms) {
          for (int64_t gate = 0; gate < gates_; ++gate) {
            const T* from = w + (gate * hidden_ + unit0) * terms + k0;
            T* to = panel + (first_term + k0) * stride + gate * kLanes;
            for (int64_t k = 0; k < kPackTerms; k += 8) {
              for (int lane = 0; lane < kLanes; lane += 8) {
                transpose_8x8(from + lane * terms + k, terms, to + k * stride + lane, stride);
              }
            }
          }
          continue;
        }
      }
#endif
      for (int64_t gate = 0; gate < gates_; ++gate) {
        for (int lane = 0; lane < kLanes; ++lane) {
          T* to = panel + first_term * stride + gate * kLanes + lane;
          if (lane < count) {
            const T* from = w + (gate * hidden_ + unit0 + lane) * terms;
            for (int64_t k = k0; k < k1; ++k) to[k * stride] = from[k];
          } else {
            for (int64_t k = k0; k < k1; ++k) to[k * stride] = T(0);
          }
        }
      }
    }
  }

  // fn(std::integral_constant<int, rows>) for rows in 1 .. max_tile_rows(Gates).
  template <int Gates, int Rows = 1, typename Fn>
  static void dispatch_rows(int rows, Fn&& fn) {
    if constexpr (Rows < max_tile_rows(Gates)) {
      if (rows != Rows) {
        dispatch_rows<Gates, Rows + 1>(rows, std::forward<Fn>(fn));
        return;
      }
    }
    fn(std::integral_constant<int, Rows>());
  }

  // Terms ahead of the loop that fetch_ahead fetches (8 to 64 measured the same).
  static constexpr int64_t kFetchAheadTerms = 8;

  // Gates first_gate .. first_gate + PassGates - 1 of the tile (of a cell of Gates gates).
  // Not inlined: inlined into the engine's step loop, GCC kept the accumulators in memory
  // as well as in registers, a store of each per term (half the rate of this kernel alone).
  // FetchNext: fetch next's terms into the L2 cache, one per term of the k loop's first terms
  // (a loop of its own: a test inside the k loop cost the same spills, twice the time).
  template <int Rows, int Gates, int PassGates, int Splits, bool FetchAhead, bool FetchNext = false>
  __attribute__((noinline)) void run_tile(const T* h, int64_t h_stride, int64_t block,
                                          int first_gate, int64_t k0, int64_t k1, T* hg,
                                          int64_t hg_stride, NextChunk next = {}) const {
    const int64_t unit0 = first_unit(block);
    const int count = units(block);
    T* out = hg + unit0 + first_gate * hidden_;
    // acc[split]: the terms k0 + split, k0 + split + Splits, ...; acc[0] also the start.
    V acc[Splits][Rows][PassGates];
    if (k0 == 0) {
      const T* bias = biases_data_ + (block * gates_ + first_gate) * kLanes;
      for (int g = 0; g < PassGates; ++g) {
        const V start = V::loadu(bias + g * kLanes);
        for (int r = 0; r < Rows; ++r) acc[0][r][g] = start;
      }
    } else {
      for (int r = 0; r < Rows; ++r) {
        for (int g = 0; g < PassGates; ++g) {
          acc[0][r][g] = V::loadu(out + r * hg_stride + g * hidden_, count);
        }
      }
    }
    for (int split = 1; split < Splits; ++split) {
      for (int r = 0; r < Rows; ++r) {
        for (int g = 0; g < PassGates; ++g) acc[split][r][g] = V(T(0));
      }
    }
    if (h != nullptr) {
      // The pass's gates of term k: PassGates vectors from panel + k * Gates * kLanes.
      const T* panel = panels_data_ + block * panel_size() + first_gate * kLanes;
      const auto add_term = [&](int64_t k, V(&sums)[Rows][PassGates]) {
        if constexpr (FetchAhead) {
          // All the gates of term k + kFetchAheadTerms: the next pass finds them in the L1
          // cache. Past the last panel this touches nothing: a prefetch never faults.
          const T* ahead = panel - first_gate * kLanes + (k + kFetchAheadTerms) * Gates * kLanes;
          for (int g = 0; g < Gates; ++g) __builtin_prefetch(ahead + g * kLanes, 0, 3);
        }
        V w[PassGates];
        for (int g = 0; g < PassGates; ++g) w[g] = V::loadu(panel + (k * Gates + g) * kLanes);
        for (int r = 0; r < Rows; ++r) {
          const V x(h[r * h_stride + (k - k0)]);
          for (int g = 0; g < PassGates; ++g) sums[r][g] = at::vec::fmadd(x, w[g], sums[r][g]);
        }
      };
      int64_t k = k0;
      if constexpr (FetchNext) {
        const T* term = next.terms;
        const int64_t fetch_end = std::min(k1, k0 + next.count);
        for (; k + Splits <= fetch_end; k += Splits) {
          for (int split = 0; split < Splits; ++split, term += Gates * kLanes) {
            for (int g = 0; g < Gates; ++g) __builtin_prefetch(term + g * kLanes, 0, 2);
            add_term(k + split, acc[split]);
          }
        }
      }
      for (; k + Splits <= k1; k += Splits) {
        for (int split = 0; split < Splits; ++split) add_term(k + split, acc[split]);
      }
      for (; k < k1; ++k) add_term(k, acc[0]);
    }
    for (int split = 1; split < Splits; ++split) {
      for (int r = 0; r < Rows; ++r) {
        for (int g = 0; g < PassGates; ++g) acc[0][r][g] = acc[0][r][g] + acc[split][r][g];
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int g = 0; g < PassGates; ++g) {
        acc[0][r][g].store(out + r * hg_stride + g * hidden_, count);
      }
    }
  }

  // keep w_hh_'s and w_ih_'s memory (a contiguous copy may be the only owner)
  at::Tensor w_hh_tensor_, w_ih_tensor_;
  const T* w_hh_;
  const T* w_ih_;  // nullptr: the panels hold W_hh's terms only
  const T* bias_;
  bool transposed_;  // Layout::Transposed
  int64_t gates_, hidden_, input_terms_, k_, blocks_;
  int64_t chunk_terms_;  // terms per chunk of the k loop (chunk_bytes of a panel)
  at::Tensor storage_;   // [blocks][K][gates][lanes]
  at::Tensor biases_;    // [blocks][gates][lanes]
  T* panels_data_;
  T* biases_data_;
  bool outgrows_core_cache_;  // the panels are larger than a core's L2 cache (next_chunk)
};

// The panels take a float or double per-step product that the BLAS would run, over at least
// this many steps (fewer do not repay the packing of W_hh) ...
constexpr int64_t kPanelMinSteps = 4;
// ... of at most this many batch rows where the BLAS is MKL on an Intel CPU: there MKL's packed
// GEMM per step ran the 64-row LSTM forward faster (256 and 512 units: 31 and 117 ms against
// 36 and 131, 2 threads of a Xeon), from 16 to 20 rows slower (16 rows of 256 units: 8.2
// against 10.8 ms; 20 rows of 650, two layers: 54 against 62). MKL on AMD CPUs runs its
// generic kernels at half of oneDNN's rate: there the panels run every batch. So do the float
// LSTM's tiles with AVX2 (3 rows of every gate, or 6 in two passes): on a 2-core AMD EPYC of the
// Zen 3 generation, where MKL runs its AVX2 kernels for Zen, MKL's packed GEMM per step ran 20-64
// rows faster than tiles of 3 rows alone, and slower than the tiles of 6 (2 threads, in one
// process, forward under no_grad: 32 rows x 100 steps of 256 units 3-26% faster in three runs,
// of 512 units 150 -> 124 ms, 64 rows of 512 units 223 -> 193 and 210 -> 178, of 256 units 1-4%
// faster; 20 rows x 35 steps of 200 units, two layers, 10.7 -> 9.5, of 512 units 74 -> 57; of
// 650 units 12% slower to 5% faster in five runs of batch-first input, 2% slower time-major
// (the word model's layout); 100 steps of 650 units 154 -> 135; the layer-normalised LSTM of 32
// rows of 256 units 33.9 -> 29.8; training steps 3% slower to 15% faster, but one run of the
// 650-unit two layers, 14% slower, the same in a second).
constexpr int64_t kPanelMaxRowsBesideFastBlas = 32;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)  // the panels' copies only
inline bool blas_is_fast_here() {
  static const bool fast = [] {
#if defined(__x86_64__) || defined(_M_X64)
    // MKL is the BLAS of torch's x86 builds.
    return cpu_vendor_is("GenuineIntel") && &sgemm_ != nullptr;
#else
    return false;
#endif
  }();
  return fast;
}

// ... or a single row's product that the tiled kernel would run, of at least this many
// multiply-adds per step: the tiled kernel runs a row on one thread, where the panels split its
// units over the threads (on a 2-core AMD EPYC, AVX2, the forward of one row of 100 steps: 256
// Elman units 2.3x as fast, 128 units 1.5x, 64 LSTM units 1.4x, 100 LSTM units 1.7x; below, as
// 64 Elman units (0.75x) and 50 GRU units (0.9x), the barrier per step costs more). The AVX-512
// tiled kernel holds out longer (on a 2-core Xeon: 0.80-0.95x for 64 and 100 LSTM units, 100
// GRU units, 128 Elman units, 16K to 40K multiply-adds; 1.09-1.27x for 128 GRU and LSTM units
// and 256 Elman units, 48K to 64K).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kPanelMinSingleRowWork = int64_t(48) << 10;
#else
constexpr int64_t kPanelMinSingleRowWork = int64_t(1) << 14;
#endif

// Whether the panels take a per-step product [rows, terms] x [terms, outputs] over `steps`
// steps: the forward's h W_hh^T (forward.cpp, options_layer.cpp) and the backward's
// dgates W_hh (backward.cpp).
template <typename T>
bool panels_take_product(int64_t rows, int64_t outputs, int64_t terms, int64_t steps) {
  using Product = RecurrentProduct<T>;
  if (steps < kPanelMinSteps || (rows > kPanelMaxRowsBesideFastBlas && blas_is_fast_here())) {
    return false;
  }
  const auto kernel = Product::kernel_for(rows, outputs, terms, steps);
  return kernel == Product::Kernel::Blas || (kernel == Product::Kernel::Tiled && rows == 1 &&
                                             outputs * terms >= kPanelMinSingleRowWork);
}
#endif

// The panels of a backward's per-step product dgates W_hh ([rows, G] x [G, P]) where
// panels_take_product takes it: W_hh^T [P, G] packed once per call (from W_hh as it is) as the
// panels of kBackwardPanelGates "gates" of P / 2 units (P even; tiles of 6 rows x 2 vectors with
// AVX2, 12 x 2 with AVX-512), run per step by product<kBackwardPanelGates>, where the BLAS repacked
// W_hh at every step (on a 2-core AMD EPYC the training steps of 16 rows of 256 and 512 LSTM
// units 6-7% faster, the 650-unit word models' 2.5-4%, the option layers' of 16 x 256 4-7%;
// 20 rows of 200 units and 64 of 256 unchanged). No panels elsewhere; with AVX-512 none for a
// single row of a W_hh under kSingleRowPanelMinBytes, whose product without them (the tiled
// kernel, or row_times_matrix) ran the training steps 5-26% faster on a 2-core Xeon (one row of
// 100 steps: 64 and 128 LSTM units, 128 GRU units, 256 and 512 Elman units). A larger W_hh
// outgrows the L2 caches, where the panels' steps in alternate orders (block_at) keep part of it
// (one row of 512 LSTM units, 4 MiB: the training step 9.1-9.8 -> 8.2-9.3 ms; 512 GRU units,
// 3 MiB, the same either way).
constexpr int kBackwardPanelGates = 2;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kSingleRowPanelMinBytes = int64_t(4) << 20;
#else
constexpr int64_t kSingleRowPanelMinBytes = 0;
#endif

// Whether the panels' tiles of a product over a batch of `rows` rows may split their terms over
// partial sums (GatePanels::product's split_terms): not in a batch that a schedule might run as
// rows per thread on some number of threads, whose shares' tiles differ from the whole batch's
// (3 threads share 25 rows as 9, 9 and 7; the 7 in tiles of 3 and 4 rows).
template <typename T>
bool splits_panel_terms(int64_t rows) {
  return rows < 2 * RecurrentProduct<T>::kMinRowsPerThread;
}

template <typename T>
std::optional<GatePanels<T>> backward_panels(const at::Tensor& w_hh, int64_t rows, int64_t steps) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const int64_t gate_size = w_hh.size(0), state_size = w_hh.size(1);
    const bool single_row_panels =
        gate_size * state_size * int64_t(sizeof(T)) >= kSingleRowPanelMinBytes;
    if ((rows > 1 || single_row_panels) && state_size % kBackwardPanelGates == 0 &&
        panels_take_product<T>(rows, state_size, gate_size, steps)) {
      std::optional<GatePanels<T>> panels(std::in_place, w_hh.contiguous(), at::Tensor(),
                                          kBackwardPanelGates, GatePanels<T>::Layout::Transposed);
      panels->pack_all();
      return panels;
    }
  }
#endif
  (void)w_hh, (void)rows, (void)steps;
  return std::nullopt;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
