// The per-step product of bfloat16 layers on AMX tiles (Intel's Advanced Matrix Extensions, from
// Sapphire Rapids on): sums[B, N] = in[B, K] M[N, K]^T in float, from bfloat16 in and M.
//
// torch.nn's bfloat16 LSTM runs oneDNN's kernel on these tiles; the float product that ran the
// steps here before (recurrent_product.h: widened) made rnnfast's bfloat16 LSTM forward 0.5-0.9x
// of oneDNN's at 256 units and more (2-core Xeon, no_grad forward of 100 steps). A tile
// multiply-add (TDPBF16PS) sums 16 rows x 16 outputs x 32 terms: per pair of terms, the product of
// two bfloat16 values is exact in float and added to the float sum, so each output is a float sum
// of exact products, as the float product's is (the order of the additions differs).
//
// M is packed once per layer call (AmxWeights), for the tiles' B operand: per block of 16
// outputs and chunk of 32 terms, a tile [16 term pairs][16 outputs][2] (1 KiB), zero past N and
// K, in block order then chunk order. A pass over a tile of rows holds the sums of 4 blocks (64
// outputs) in tiles 0-3 over all chunks, with the rows' chunk in tile 4 and M's in tiles 5-7.
// A batch of a few rows runs as AVX512-BF16 dot products on the same packed M (row_product).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "capability.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
#define RNNFAST_AMX_PRODUCT 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace amx {

constexpr int64_t kTileRows = 16;      // rows of A's and C's tiles; term pairs of B's
constexpr int64_t kChunkTerms = 32;    // bfloat16 terms of a row of an A tile (64 bytes)
constexpr int64_t kBlockOutputs = 16;  // float outputs of a row of a C tile (64 bytes)
constexpr int64_t kPassBlocks = 4;     // C tiles of a pass (tiles 0-3)
constexpr int64_t kTileElements = kTileRows * kChunkTerms;  // bfloat16 values of A's and B's tiles
constexpr int64_t kPassOutputs = kPassBlocks * kBlockOutputs;  // outputs of a pass

#if defined(RNNFAST_AMX_PRODUCT)

// Whether RNNFAST_CPU_AMX=0 turns off the products here (AMX's tiles and the dot products of
// row_product; read per layer call).
inline bool turned_off() {
  const char* setting = std::getenv("RNNFAST_CPU_AMX");
  return setting != nullptr && std::strcmp(setting, "0") == 0;
}

// Whether this process runs AMX's bfloat16 tiles: the CPU has them (CPUID leaf 7: AMX-TILE,
// AMX-BF16) and Linux grants the process their register state (arch_prctl's
// ARCH_REQ_XCOMP_PERM for XTILEDATA, which a process asks for once before its first tile
// instruction; torch's oneDNN asks for it too), unless turned_off.
inline bool usable() {
  static const bool granted = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return amx_bf16 && amx_tile && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted && !turned_off();
}

// Whether the CPU has AVX512-BF16's dot products of bfloat16 pairs (CPUID leaf 7, subleaf 1:
// EAX bit 5), which row_product runs; every CPU with AMX's tiles has them.
inline bool has_bf16_dot_products() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1);
  }();
  return has;
}

// Whether row_product's dot products run here: the CPU has them, unless turned_off. Where AMX's
// tiles are not usable (an AMD EPYC of the Zen 4 family, a Xeon of Cooper Lake) they run every
// bfloat16 product that the tiles would run.
inline bool dot_products_usable() { return has_bf16_dot_products() && !turned_off(); }

// The tile configuration (palette 1): tiles 0-3 C [rows x 16 floats], 4 A [rows x 32
// bfloat16], 5-7 B [16 term pairs x 16 outputs x 2].
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  explicit TileConfig(int64_t c_rows) {
    for (int tile = 0; tile < 8; ++tile) {
      bytes_per_row[tile] = 64;
      rows[tile] = static_cast<uint8_t>(tile <= 4 ? c_rows : kTileRows);
    }
  }
};

class AmxWeights {
 public:
  AmxWeights() = default;

  // M [N, K] bfloat16, any strides.
  explicit AmxWeights(const at::Tensor& matrix)
      : n_(matrix.size(0)),
        k_(matrix.size(1)),
        passes_((n_ + kPassOutputs - 1) / kPassOutputs),
        chunks_((k_ + kChunkTerms - 1) / kChunkTerms) {
    const int64_t blocks = passes_ * kPassBlocks;
    tiles_ = at::zeros({blocks * chunks_ * kTileElements}, matrix.options());
    auto* tiles = tiles_.data_ptr<at::BFloat16>();
    const auto* m = matrix.data_ptr<at::BFloat16>();
    const int64_t row_stride = matrix.stride(0), term_stride = matrix.stride(1);
    // Split over the threads by blocks from kPackGrain weights a share.
    constexpr int64_t kPackGrain = int64_t(1) << 16;
    const int64_t grain =
        std::max<int64_t>(1, kPackGrain / (kBlockOutputs * std::max<int64_t>(k_, 1)));
    if (term_stride == 1 && k_ % 2 == 0 && row_stride % 2 == 0) {
      // M's rows as pairs of terms (32 bits each): tile (block, chunk) is the transpose of the
      // block's 16 rows by the chunk's 16 pairs, 16 x 16 transposes in vector registers (a
      // loop of single values took 4% of a 256-unit LSTM's 100-step forward, and more than the
      // steps of the 2-layer energy models' 2).
      const float* pairs = reinterpret_cast<const float*>(m);
      const int64_t pair_stride = row_stride / 2, row_pairs = k_ / 2;
      at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t rows = std::min(kBlockOutputs, n_ - block * kBlockOutputs);
          for (int64_t chunk = 0; rows > 0 && chunk < chunks_; ++chunk) {
            const int64_t count = std::min(kTileRows, row_pairs - chunk * kTileRows);
            at::vec::transpose_mxn_16x16(
                pairs + block * kBlockOutputs * pair_stride + chunk * kTileRows, pair_stride,
                reinterpret_cast<float*>(tiles + (block * chunks_ + chunk) * kTileElements),
                kBlockOutputs, static_cast<int>(rows), static_cast<int>(count));
          }
        }
      });
      return;
    }
    if (row_stride == 1) {
      // M's columns contiguous (W_hh^T, the backward's product of W_hh): row p of tile (block,
      // chunk) interleaves the block's 16 outputs of terms 2p and 2p + 1, two runs of 16 values.
      at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t rows = std::min(kBlockOutputs, n_ - block * kBlockOutputs);
          if (rows <= 0) continue;
          const __mmask16 lanes = __mmask16((1u << rows) - 1);
          const at::BFloat16* first = m + block * kBlockOutputs;
          for (int64_t term = 0; term < k_; term += 2) {
            const __m512i even =
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, first + term * term_stride));
            const __m512i odd = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                term + 1 < k_ ? lanes : __mmask16(0), first + (term + 1) * term_stride));
            at::BFloat16* tile = tiles + (block * chunks_ + term / kChunkTerms) * kTileElements;
            _mm512_storeu_si512(tile + term % kChunkTerms * kBlockOutputs,
                                _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
          }
        }
      });
      return;
    }
    // Any other strides: term 2p + h of chunk c of output row `row` is value (p, row % 16, h) of
    // tile (block, c), M's rows read in order.
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin * kBlockOutputs; row < std::min(n_, end * kBlockOutputs); ++row) {
        const at::BFloat16* from = m + row * row_stride;
        at::BFloat16* block_tiles = tiles + row / kBlockOutputs * chunks_ * kTileElements;
        const int64_t lane = row % kBlockOutputs;
        for (int64_t term = 0; term < k_; ++term) {
          const int64_t chunk = term / kChunkTerms, pair = term % kChunkTerms / 2;
          block_tiles[chunk * kTileElements + (pair * kBlockOutputs + lane) * 2 + term % 2] =
              from[term * term_stride];
        }
      }
    });
  }

  int64_t n() const { return n_; }
  // Columns of product()'s sums: N rounded up to a pass's outputs.
  int64_t padded_n() const { return passes_ * kPassOutputs; }

  // Passes of 64 outputs (padded_n() / 64).
  int64_t passes() const { return passes_; }

  // sums[batch, padded_n()] = in[batch, K] M^T (in's rows K apart), passes [first_pass,
  // end_pass) of it: outputs 64 * first_pass .. 64 * end_pass - 1.
  __attribute__((target("amx-tile,amx-bf16"))) void product(const at::BFloat16* in, int64_t batch,
                                                            float* sums, int64_t first_pass,
                                                            int64_t end_pass) const {
    const int64_t padded_k = chunks_ * kChunkTerms, ldo = padded_n();
    // A tile's rows: in's own where K is whole chunks, else copies with K padded to whole
    // chunks (zeros: a term past K, whatever its value, must add nothing, and reading past the
    // row would read the next row's NaN or infinity).
    const bool padded = padded_k != k_;
    thread_local std::vector<at::BFloat16> padded_rows;
    if (padded) padded_rows.resize(kTileRows * padded_k);
    const auto* packed = tiles_.data_ptr<at::BFloat16>();
    int64_t configured_rows = 0;
    for (int64_t r0 = 0; r0 < batch; r0 += kTileRows) {
      const int64_t count = std::min(kTileRows, batch - r0);
      if (count != configured_rows) {
        const TileConfig config(count);
        _tile_loadconfig(&config);
        configured_rows = count;
      }
      for (int64_t r = 0; padded && r < count; ++r) {
        at::BFloat16* row = padded_rows.data() + r * padded_k;
        std::copy(in + (r0 + r) * k_, in + (r0 + r + 1) * k_, row);
        std::fill(row + k_, row + padded_k, at::BFloat16(0.0f));
      }
      const at::BFloat16* rows = padded ? padded_rows.data() : in + r0 * k_;
      for (int64_t pass = first_pass; pass < end_pass; ++pass) {
        const at::BFloat16* block0 = packed + pass * kPassBlocks * chunks_ * kTileElements;
        const int64_t block_step = chunks_ * kTileElements;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t chunk = 0; chunk < chunks_; ++chunk) {
          const at::BFloat16* b = block0 + chunk * kTileElements;
          // M's next chunk of each block, fetched into the L1 cache while this chunk's tiles
          // run: the tile loads alone read M from the L2 cache at a fraction of its rate
          // (16 rows x 1024 x 256 on one core of a Xeon: 26 -> 23 us).
          const bool fetches = chunk + 1 < chunks_;
          _tile_loadd(4, rows + chunk * kChunkTerms, padded_k * 2);
          _tile_loadd(5, b, 64);
          _tile_dpbf16ps(0, 4, 5);
          if (fetches) fetch_tile(b + kTileElements);
          _tile_loadd(6, b + block_step, 64);
          _tile_dpbf16ps(1, 4, 6);
          if (fetches) fetch_tile(b + block_step + kTileElements);
          _tile_loadd(7, b + 2 * block_step, 64);
          _tile_dpbf16ps(2, 4, 7);
          if (fetches) fetch_tile(b + 2 * block_step + kTileElements);
          _tile_loadd(5, b + 3 * block_step, 64);
          _tile_dpbf16ps(3, 4, 5);
          if (fetches) fetch_tile(b + 3 * block_step + kTileElements);
        }
        float* out = sums + r0 * ldo + pass * kPassOutputs;
        _tile_stored(0, out, ldo * 4);
        _tile_stored(1, out + kBlockOutputs, ldo * 4);
        _tile_stored(2, out + 2 * kBlockOutputs, ldo * 4);
        _tile_stored(3, out + 3 * kBlockOutputs, ldo * 4);
      }
    }
    // The tiles' state is large: released, a context switch need not save it.
    _tile_release();
  }

  // product()'s sums by AVX512-BF16 dot products (VDPBF16PS) on the same packed M, for a batch
  // of a few rows, or of any size on a CPU without AMX's tiles: row p of a tile holds 16
  // outputs' terms 2p and 2p + 1, multiplied by a row's pair of terms (broadcast) and added to
  // the row's 16 float sums. A tile multiply-add would spend a tile of 16 rows on a few (one row
  // of 256 LSTM units ran in float instead, at 0.7x of torch.nn's oneDNN on AMX; as dot products
  // at 1.6x). Each product of a pair is exact in float, as a tile's; the even and odd pairs of a
  // chunk go to two sums per block (8 chains of dependent additions per row), added at the end.
  // Rows run two at a time (each of M's vectors loaded once for both), the last alone where the
  // batch is odd; a row's sums run in the same order either way, so on any thread. Pass by pass,
  // each over all rows: a pass's part of M (chunks_ KiB per block) stays in the L2 cache for
  // every row, where M itself may not (2 MiB at 512 LSTM units). On 2 threads of a Zen 4 EPYC,
  // against each pair of rows through all passes: the forward of 16 and 64 rows of 512 LSTM
  // units 24.1 -> 22.1 and 88.8 -> 82.6 ms, the 650-unit word model's 36.8 -> 34.5.
  __attribute__((target("avx512f,avx512bf16"))) void row_product(const at::BFloat16* in,
                                                                 int64_t batch, float* sums,
                                                                 int64_t first_pass,
                                                                 int64_t end_pass) const {
    // The rows' terms as pairs (32 bits), as product() reads its rows: in's own where K is whole
    // chunks, else copies with K padded to whole chunks (zeros: a term past K must add nothing).
    const int64_t padded_k = chunks_ * kChunkTerms;
    const at::BFloat16* rows = in;
    if (padded_k != k_) {
      thread_local std::vector<at::BFloat16> padded_rows;
      padded_rows.resize(batch * padded_k);
      for (int64_t r = 0; r < batch; ++r) {
        at::BFloat16* terms_end =
            std::copy(in + r * k_, in + (r + 1) * k_, padded_rows.data() + r * padded_k);
        std::fill(terms_end, terms_end + (padded_k - k_), at::BFloat16(0.0f));
      }
      rows = padded_rows.data();
    }
    for (int64_t pass = first_pass; pass < end_pass; ++pass) {
      int64_t r = 0;
      for (; r + 2 <= batch; r += 2) rows_pass<2>(rows, padded_k, r, sums, pass);
      if (r < batch) rows_pass<1>(rows, padded_k, r, sums, pass);
    }
  }

 private:
  // row_product's sums of rows r .. r + Rows - 1 (`row_terms` apart in `rows`) for pass `pass`.
  template <int Rows>
  __attribute__((target("avx512f,avx512bf16"))) void rows_pass(const at::BFloat16* rows,
                                                               int64_t row_terms, int64_t r,
                                                               float* sums, int64_t pass) const {
    const int64_t block_step = chunks_ * kTileElements;
    const int32_t* pairs[Rows];
    for (int row = 0; row < Rows; ++row) {
      pairs[row] = reinterpret_cast<const int32_t*>(rows + (r + row) * row_terms);
    }
    const at::BFloat16* block0 = tiles_.data_ptr<at::BFloat16>() + pass * kPassBlocks * block_step;
    __m512 even[Rows][kPassBlocks], odd[Rows][kPassBlocks];
    for (int row = 0; row < Rows; ++row) {
      for (int64_t block = 0; block < kPassBlocks; ++block) {
        even[row][block] = odd[row][block] = _mm512_setzero_ps();
      }
    }
    for (int64_t chunk = 0; chunk < chunks_; ++chunk) {
      const at::BFloat16* tile = block0 + chunk * kTileElements;
      for (int64_t pair = 0; pair < kTileRows; pair += 2) {
        __m512bh x_even[Rows], x_odd[Rows];
        for (int row = 0; row < Rows; ++row) {
          const int32_t* chunk_pairs = pairs[row] + chunk * kTileRows;
          x_even[row] = (__m512bh)_mm512_set1_epi32(chunk_pairs[pair]);
          x_odd[row] = (__m512bh)_mm512_set1_epi32(chunk_pairs[pair + 1]);
        }
        for (int64_t block = 0; block < kPassBlocks; ++block) {
          const at::BFloat16* m_row = tile + block * block_step + pair * 2 * kBlockOutputs;
          const __m512bh m_even = (__m512bh)_mm512_loadu_si512(m_row);
          const __m512bh m_odd = (__m512bh)_mm512_loadu_si512(m_row + 2 * kBlockOutputs);
          for (int row = 0; row < Rows; ++row) {
            even[row][block] = _mm512_dpbf16_ps(even[row][block], m_even, x_even[row]);
            odd[row][block] = _mm512_dpbf16_ps(odd[row][block], m_odd, x_odd[row]);
          }
        }
      }
    }
    const int64_t ldo = padded_n();
    for (int row = 0; row < Rows; ++row) {
      float* out = sums + (r + row) * ldo + pass * kPassOutputs;
      for (int64_t block = 0; block < kPassBlocks; ++block) {
        _mm512_storeu_ps(out + block * kBlockOutputs,
                         _mm512_add_ps(even[row][block], odd[row][block]));
      }
    }
  }

  // A tile of M (1 KiB: 16 cache lines) into the L1 cache.
  static void fetch_tile(const at::BFloat16* tile) {
    const char* bytes = reinterpret_cast<const char*>(tile);
    for (int line = 0; line < 16; ++line) _mm_prefetch(bytes + 64 * line, _MM_HINT_T0);
  }

  at::Tensor tiles_;
  int64_t n_ = 0, k_ = 0, passes_ = 0, chunks_ = 0;
};

#else  // no AMX in this copy of the engine

inline bool usable() { return false; }
inline bool has_bf16_dot_products() { return false; }
inline bool dot_products_usable() { return false; }

class AmxWeights {
 public:
  AmxWeights() = default;
  explicit AmxWeights(const at::Tensor&) {}
  int64_t n() const { return 0; }
  int64_t padded_n() const { return 0; }
  int64_t passes() const { return 0; }
  void product(const at::BFloat16*, int64_t, float*, int64_t, int64_t) const {
    TORCH_INTERNAL_ASSERT(false, "rnnfast: AMX tiles in an engine compiled without them");
  }
  void row_product(const at::BFloat16*, int64_t, float*, int64_t, int64_t) const {
    TORCH_INTERNAL_ASSERT(false, "rnnfast: AMX tiles in an engine compiled without them");
  }
};

#endif

}  // namespace amx
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
