// The CPU engine's forward (engine.h): the input projection, the time loop and its kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>

#include "../buffer_pool.h"
#include "blas.h"
#include "capability.h"
#include "gate_panels.h"
#include "input_layout.h"
#include "kernels.h"
#include "layer_view.h"
#include "recurrent_product.h"
#include "register_layer.h"
#include "schedule.h"
#include "step_barrier.h"
#include "vector_math.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace {

// Whether every value of w (contiguous) is finite. Only then is the product of a zero state with
// W_hh zero, so that the first step of a call without hx may skip it: torch.nn multiplies, and
// a NaN or Inf in W_hh makes that step's gates NaN (0 * NaN and 0 * Inf are NaN). One pass over
// the exponent bits (an integer reduction the compiler vectorizes), once per call.
template <typename T>
bool all_finite(const Tensor& w) {
  const T* data = w.data_ptr<T>();
  const int64_t n = w.numel();
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using Bits = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
    constexpr Bits kExponent =
        std::is_same_v<T, float> ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
    Bits non_finite = 0;  // 1 once a value's exponent field is all ones (NaN or Inf)
    for (int64_t i = 0; i < n; ++i) {
      Bits bits;
      std::memcpy(&bits, data + i, sizeof(bits));
      non_finite |= Bits((bits & kExponent) == kExponent);
    }
    return non_finite == 0;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(float(data[i]))) return false;
    }
    return true;
  }
}

// all_finite(w_hh), remembered per thread for the last kRemembered tensors asked about while
// they live and keep their data and version: an inference loop passes the same weights every
// call, and the scan reads all of W_hh, as much memory as a two-step sequence's products (the
// course's 2-layer energy model's forward 0.30 -> 0.36 ms with a scan per call; its two layers'
// weights, one remembered, took turns at the one place: 0.43 ms). Any in-place change (an
// optimizer's step, load_state_dict) bumps the version; a change through a `.data` alias does
// not, as for autograd's own checks.
template <typename T>
bool w_hh_all_finite(const Tensor& w_hh) {
  struct Remembered {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> tensor;
    const void* data = nullptr;
    int64_t version = -1;
    bool finite = false;
  };
  // Every layer and direction of a deep bidirectional stack (8 layers of 2), replaced in turn.
  constexpr int kRemembered = 16;
  thread_local std::array<Remembered, kRemembered> remembered;
  thread_local int next_place = 0;
  const void* data = w_hh.data_ptr();
  const int64_t version = w_hh._version();
  for (const Remembered& entry : remembered) {
    if (entry.tensor && entry.data == data && entry.version == version) {
      const auto alive = entry.tensor->lock();
      if (alive.get() == w_hh.unsafeGetTensorImpl()) return entry.finite;
    }
  }
  Remembered& entry = remembered[next_place];
  next_place = (next_place + 1) % kRemembered;
  entry.finite = all_finite<T>(w_hh);
  entry.tensor.emplace(w_hh.getIntrusivePtr());
  entry.data = data;
  entry.version = version;
  return entry.finite;
}

// b_ih + b_hh [G], added in the accumulation type.
template <typename T>
Tensor summed_biases(const Tensor& b_ih, const Tensor& b_hh) {
  using A = at::opmath_type<T>;
  Tensor sum = at::empty_like(b_ih);
  const T *a = b_ih.data_ptr<T>(), *b = b_hh.data_ptr<T>();
  T* out = sum.data_ptr<T>();
  for (int64_t n = 0; n < b_ih.numel(); ++n) out[n] = T(A(a[n]) + A(b[n]));
  return sum;
}

// One run of units j of a row's forward step (H: the gate stride of xg_row, hg_row, ws_row):
// reads h_prev_row (GRU) and c_row (LSTM, updated in place), writes h_new_row (which may be
// h_prev_row: a unit's h_prev is read first) and the saved values; returns the new h.
template <typename Cell, typename T, typename A, typename Index, typename V>
inline V forward_run(int H, Index j, V zero, const T* xg_row, const T* hg_row, const T* h_prev_row,
                     A* c_row, T* h_new_row, T* ws_row) {
  const V h_prev = Cell::kReadsPrevHidden ? load<V>(h_prev_row, 0, j) : zero;
  const V c_prev = c_row ? load<V>(c_row, 0, j) : zero;
  V h_new = zero, c_new = zero;
  Cell::forward(H, j, xg_row, hg_row, h_prev, c_prev, h_new, c_new, ws_row);
  store(h_new_row, 0, j, h_new);
  if (c_row) store(c_row, 0, j, c_new);
  return h_new;
}

// Where row b of step t of the input projection xg starts: time-major rows (step = B * row
// stride), or batch-major ones (batch = T * G) where the GEMM ran on a batch_first input as it
// is; the gate-packed view's one row per step spans B * G. `data` holds the steps from time
// first_time on (all, or those of a chunk of steps). In a packed workspace (rows_before: its
// rows before each step, LayerView::saved_rows_before) row b of step t is row
// rows_before[t] + b, at a stride of `batch`.
template <typename T>
struct StepRows {
  const T* data;
  int64_t step, batch;
  int64_t first_time = 0;
  const int64_t* rows_before = nullptr;
  const T* row(int64_t t, int64_t b) const {
    return rows_before ? data + (rows_before[t] + b) * batch
                       : data + (t - first_time) * step + b * batch;
  }
};

// The input where the forward's steps project it themselves (run_forward_by_panels): x_t W_ih^T
// in the same tiles as h_{t-1} W_hh^T, with no xg over all steps. Row b of time t: `input_size`
// values at data + t * step + b * batch. w_ih [G, I]; undefined where xg holds the projection.
template <typename T>
struct StepInput {
  Tensor w_ih;
  const T* data = nullptr;
  int64_t step = 0, batch = 0;
  bool defined() const { return w_ih.defined(); }
  const T* row(int64_t t, int64_t b) const { return data + t * step + b * batch; }
};

// The steps [begin, end) of a call that one run of the time loop takes (in the loop's order:
// step s is time v.step_time(s)).
struct StepRange {
  int64_t begin, end;
};

// Whether the forward runs in the panel schedule: a product the panels take
// (panels_take_product); float or double with SIMD vectors; no projection; one thread, or the
// threads of a region that run concurrently (OpenMP's: StepBarrier spins).
template <typename T>
bool runs_by_panels(const LayerView<T>& v, bool projecting) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const bool concurrent_threads =
        AT_PARALLEL_OPENMP || at::get_num_threads() == 1 || at::in_parallel_region();
    return !projecting && !v.gate_packed && concurrent_threads &&
           panels_take_product<T>(v.product_rows, v.G, v.P, v.T_);
#endif
  }
  (void)v, (void)projecting;
  return false;
}

// Where the panel schedule splits the batch rows over the threads rather than the panels: where
// the steps read the input's projection from xg (no step input) and all panels fit in a core's
// L2 cache, from this many rows. Each thread then reads every panel at each step from its own
// cache, and its rows of xg whole, and waits for no other thread. (On 2 threads of a Xeon, no_grad
// forward: GRU 16 rows x 100 steps of 256 units 10-15% faster, 32 rows 8%, 16 rows of 384 units
// (1.8 MB of panels) 4-7%, 20 rows x 35 steps of 200 units 20%, the 200-unit word model's GRU
// 10-12% and its training step 4-8%; the LSTM's 20 x 200 with xg 9%. On 1 thread the same. With
// a step input, whose panels hold W_ih too, no faster: the LSTM's 20 x 200 and 16 x 256, the
// Elman's 16 x 256.) The rule does not depend on the thread count: a call sums each output in
// the same order on any number of threads.
constexpr int64_t kPanelSplitRowsMinRows = 16;

template <typename T>
bool panels_split_rows(int64_t rows, int64_t terms, int64_t gate_columns, bool projects_input) {
  return !projects_input && rows >= kPanelSplitRowsMinRows &&
         terms * gate_columns * int64_t(sizeof(T)) <= core_cache_bytes();
}

// The panel schedule split by panels fetches h_{t-1} up to this many bytes before a step's tiles.
// (Medians of 4-5 runs, no_grad forward of 100 steps on 2 threads of a Xeon: the LSTM's 1 row of
// 256 units 0.91 -> 0.87 ms, 4 rows 2.09 -> 1.99, 16 rows 6.68 -> 6.56; the Elman's 1 row of
// 512 units 0.97 -> 0.92; on 1 thread the same. 16 rows of 512 LSTM units and the 650-unit word
// model, 32-52 KB of h, ran the same: not taken.)
constexpr int64_t kFetchedStateBytes = int64_t(16) << 10;

// Whether every tile of a step's `rows` rows in the panel schedule (GatePanels::row_tiles) sums
// its terms in one chain, as tiles of any shape then do: no term splits (term_splits), which
// tiles of few accumulators take.
template <typename T, int Gates>
bool tiles_sum_in_order(int64_t rows) {
  using Panels = GatePanels<T>;
  const auto tiles = Panels::template row_tiles<Gates>(rows);
  for (int64_t tile = 0; tile < tiles.count; ++tile) {
    const int tile_rows = static_cast<int>(tiles.begin(tile + 1) - tiles.begin(tile));
    const int pass_gates = tile_rows > Panels::rows_per_tile(Gates) ? Gates / 2 : Gates;
    if (Panels::term_splits(tile_rows * pass_gates) > 1) return false;
  }
  return true;
}

// The forward in the panel schedule: one parallel region, each thread on its panels (blocks of
// hidden units, every gate) for all batch rows and steps, one barrier per step, or
// (panels_split_rows) on all panels for its share of the batch rows. Per panel and
// tile of rows, the product's tile and at once the cell math of its units. h alternates
// between two buffers: a thread's product of step s reads all of h_{s-1} while another
// thread may already be writing its units of h_s.
//
// PanelGates: the panels' gates, Cell::kGates, or for the Elman cell (H even) 2: its one gate
// as two of H / 2 units, so that a tile holds 2 vectors of units by half the rows (AVX2: 6 x 2,
// where 12 x 1 took a broadcast of h per multiply-add; AVX-512: 12 x 2, where 12 x 1 left half
// the accumulators unused), and each panel serves units j .. j + lanes - 1 and
// H / 2 + j .. H / 2 + j + lanes - 1. (On a 2-core AMD EPYC the forward of 16 and 64 rows of
// 512 units 8-10% faster, of one row 12%, of the 650-unit word model within 2%.)
//
// With a step input (a cell that reads xg and hg only as their sum), the panels hold
// [W_ih | W_hh] and each tile sums x_t W_ih^T + h_{t-1} W_hh^T + bias into hg; xg is not read.
template <typename Cell, typename T, int PanelGates>
void run_forward_by_panels(const LayerView<T>& v, StepRange steps, bool zero_initial_state,
                           StepRows<T> xg, const StepInput<T>& input, const Tensor& w_hh,
                           const Tensor& step_bias, Tensor& h_state, Tensor& c_state,
                           Tensor& output, Tensor& workspace) {
  using A = at::opmath_type<T>;
  const int64_t B = v.B, H = v.H, G = v.G, W = v.W;  // no projection: P == H
  const bool saving = workspace.dim() > 1;  // [T, B, W] or [N, W] when saving, [0] otherwise
  static_assert(PanelGates % Cell::kGates == 0);
  // The runs of units a panel serves, H / kUnitRuns apart.
  constexpr int kUnitRuns = PanelGates / Cell::kGates;
  const int64_t run_distance = H / kUnitRuns;
  const bool projects_input = input.defined();
  GatePanels<T> panels(w_hh.contiguous(), step_bias, PanelGates, GatePanels<T>::Layout::Rows,
                       projects_input ? input.w_ih.contiguous() : Tensor());
  const int64_t input_terms = projects_input ? input.w_ih.size(1) : 0;
  // With the projection in hg, the cell's xg is zeros (it reads their sum).
  const std::vector<T> zero_gates(projects_input ? G : 0, T(0));
  Tensor hg = at::empty({B, G}, h_state.options());
  // [(s - steps.begin) % 2]: h before step s
  Tensor h_buffers = at::empty({2, B, H}, h_state.options());
  h_buffers[0].copy_(h_state);
  T* hg_data = hg.data_ptr<T>();
  T* h_data = h_buffers.data_ptr<T>();
  A* c_data = Cell::kHasCellState ? c_state.data_ptr<A>() : nullptr;  // [B, H]
  T* out_data = output.data_ptr<T>();
  T* ws_data = saving && W > 0 ? workspace.data_ptr<T>() : nullptr;

  // The cell math of rows b0 .. b1 - 1, units `units`, of step t, from hg. Inlined (as run_step
  // below): with two schedules calling it, GCC made it a call per tile.
  const auto pointwise = [&](int64_t t, int64_t b0, int64_t b1, VectorUnits units, const T* h_prev,
                             T* h_next) __attribute__((always_inline)) {
    const int64_t u0 = units.j, u1 = u0 + units.count;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = t * B + b;
      const bool active = v.active(t, b);
      T* out_row = out_data + row * H;
      // A packed workspace has no rows for the rows that have ended.
      T* ws_row =
          ws_data && (active || !v.saved_rows_packed()) ? ws_data + v.saved_row(t, b) * W : nullptr;
      const T* h_prev_row = h_prev + b * H;
      T* h_next_row = h_next + b * H;
      if (!active) {
        // The row keeps its state; its output and saved values of the step are zero.
        std::copy(h_prev_row + u0, h_prev_row + u1, h_next_row + u0);
        std::fill(out_row + u0, out_row + u1, T(0));
        for (int64_t group = 0; ws_row && group < W / H; ++group) {
          std::fill(ws_row + group * H + u0, ws_row + group * H + u1, T(0));
        }
        continue;
      }
      A* c_row = c_data ? c_data + b * H : nullptr;
      const T* xg_row = projects_input ? zero_gates.data() : xg.row(t, b);
      const auto h = forward_run<Cell>(static_cast<int>(H), units, Vec<A>(A(0)), xg_row,
                                       hg_data + b * G, h_prev_row, c_row, h_next_row, ws_row);
      store(out_row, 0, units, h);
    }
  };

  // What the cell math of rows b0 .. b1 - 1, units `units`, of step t reads from memory that is
  // not in cache (xg: a step's rows are a few hundred KB apart from the last time they were
  // read, in another step; c), fetched into the L2 cache while the product's tile runs: the
  // hardware's prefetchers do not follow strides of a row per gate, and the cells waited on
  // these loads for a third of their time (64 rows of 512 LSTM units).
  const auto fetch_cell_inputs = [&](int64_t t, int64_t b0, int64_t b1, VectorUnits units) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!projects_input) {
        const T* xg_row = xg.row(t, b) + units.j;
        for (int gate = 0; gate < Cell::kGates; ++gate) __builtin_prefetch(xg_row + gate * H, 0, 2);
      }
      if (c_data) __builtin_prefetch(c_data + b * H + units.j, 1, 2);
    }
  };

  const int64_t K = panels.terms(), chunk = panels.chunk_terms();
  // A run of the product's terms from one source: row r of the tile's rows b0 .. at
  // rows + (b0 + r) * stride (nullptr: zeros).
  struct Terms {
    int64_t begin, end;
    const T* rows;
    int64_t stride;
  };
  const bool split_rows = panels_split_rows<T>(B, K, G, projects_input);
  // Split by panels, each thread wrote its units of h_{t-1} in the last step, and the tiles'
  // broadcasts reached the other core's lines one at a time as their terms came: where h is
  // small, a step fetches all of it into the L1 cache before its tiles. (Split by rows, each
  // thread's rows are its own, in its cache already.)
  const bool fetches_state = !split_rows && B * H * int64_t(sizeof(T)) <= kFetchedStateBytes;
  // Step `step` of blocks [first, end) (in block_at's order) for batch rows [r0, r1). Inlined
  // into both schedules' loops (its tiles' row dispatch is in the hottest path).
  const auto run_step = [&](int64_t step, int64_t first, int64_t end, int64_t r0, int64_t r1,
                            auto split_terms) __attribute__((always_inline)) {
    const int64_t t = v.step_time(step);
    const int64_t parity = (step - steps.begin) % 2;
    const T* h_prev = h_data + parity * B * H;
    T* h_next = h_data + (1 - parity) * B * H;
    const T* h_rows = zero_initial_state && step == 0 ? nullptr : h_prev;
    if (h_rows && fetches_state) prefetch_row</*Locality=*/3>(h_rows, B * H);
    // The input's terms (0 .. I - 1, where the steps project it), then h's (I .. K - 1), which
    // add nothing from zero states: then, where no input's terms run, a tile without terms
    // sets the bias.
    Terms sources[2];
    int source_count = 0;
    if (projects_input) sources[source_count++] = {0, input_terms, input.row(t, 0), input.batch};
    if (h_rows || source_count == 0) sources[source_count++] = {input_terms, K, h_rows, H};
    // The rows that have ended (a packed sequence's, in order of length) run no product. The
    // row tiles cover the others (GatePanels::row_tiles: none of 2 rows where avoidable).
    const int64_t rows_end = v.active_end(t, r0, r1);
    const auto row_tiles = GatePanels<T>::template row_tiles<PanelGates>(rows_end - r0);
    for (int64_t index = 0; index < end - first; ++index) {
      const int64_t block = GatePanels<T>::block_at(first, end, index, parity);
      // the block after it, whose first chunk the last chunk's tiles fetch (-1: none)
      const int64_t next_block =
          index + 1 < end - first ? GatePanels<T>::block_at(first, end, index + 1, parity) : -1;
      VectorUnits unit_runs[kUnitRuns];
      for (int run = 0; run < kUnitRuns; ++run) {
        unit_runs[run] = {static_cast<int>(panels.first_unit(block) + run * run_distance),
                          panels.units(block)};
      }
      // The k loop in chunks that stay in the L1 cache over all row tiles; after the last
      // chunk of a tile, its cell math while the tile is in L1 too.
      for (int source = 0; source < source_count; ++source) {
        const Terms& terms = sources[source];
        for (int64_t k0 = terms.begin, k1; k0 < terms.end; k0 = k1) {
          k1 = terms.rows ? std::min(terms.end, k0 + chunk) : terms.end;
          const bool last_chunk = source == source_count - 1 && k1 == terms.end;
          for (int64_t row_tile = 0; row_tile < row_tiles.count; ++row_tile) {
            const int64_t b0 = r0 + row_tiles.begin(row_tile);
            const int64_t b1 = r0 + row_tiles.begin(row_tile + 1);
            if (k0 == 0) {
              for (const VectorUnits& units : unit_runs) fetch_cell_inputs(t, b0, b1, units);
            }
            const T* tile_rows =
                terms.rows ? terms.rows + b0 * terms.stride + (k0 - terms.begin) : nullptr;
            panels.template tile<PanelGates, decltype(split_terms)::value>(
                tile_rows, terms.stride, static_cast<int>(b1 - b0), block, k0, k1, hg_data + b0 * G,
                G, row_tile == 0,
                panels.next_chunk(block, k1, next_block, row_tile, row_tiles.count));
            if (last_chunk) {
              for (const VectorUnits& units : unit_runs) {
                pointwise(t, b0, b1, units, h_prev, h_next);
              }
            }
          }
        }
      }
      // The ended rows keep their state and write zeros.
      for (const VectorUnits& units : unit_runs) pointwise(t, rows_end, r1, units, h_prev, h_next);
    }
  };

  if (split_rows) {
    // Each thread runs all panels for its share of the rows, every step: its rows of h are its
    // own, so no thread waits for another. A row's sums run in the same order in a tile of any
    // shape without split terms, so on any number of threads.
    panels.pack_all();
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t step = steps.begin; step < steps.end; ++step) {
        run_step(step, 0, panels.blocks(), r0, r1, std::false_type());
      }
    });
  } else {
    // The threads' shares in halves of blocks (each block's rows in two halves, rows
    // [0, half_rows) and [half_rows, B)), so that a share may end in the middle of a block: 13
    // blocks on 2 threads, split 7 and 6 (a thread waited for the other a seventh of each step),
    // run as 6.5 each (one layer of 20 rows of 200 LSTM units, the word model's, 43.1 -> 41.4 us
    // a step under no_grad on 2 threads of a Xeon; means of three processes of each). Only
    // where every tile of both halves and of the whole batch sums its terms
    // in one chain (tiles_sum_in_order): a row's sums are then the same whichever share runs it,
    // on any number of threads.
    const int64_t half_rows = B / 2;
    const bool halves = B >= 2 && tiles_sum_in_order<T, PanelGates>(B) &&
                        tiles_sum_in_order<T, PanelGates>(half_rows) &&
                        tiles_sum_in_order<T, PanelGates>(B - half_rows);
    const int64_t per_block = halves ? 2 : 1;
    StepBarrier barrier(panels.blocks() * per_block);
    at::parallel_for(0, panels.blocks() * per_block, 1, [&](int64_t begin, int64_t end) {
      // Halves [begin, end): blocks [first, last) whole, and the second half of block
      // first - 1 before them (leading) and the first half of block last after them (trailing).
      const int64_t first = (begin + per_block - 1) / per_block, last = end / per_block;
      const bool leading = begin % per_block != 0, trailing = end % per_block != 0;
      // Each block is packed by the thread that runs its first half; with halves, a thread may
      // read a block another thread packed, after the barrier.
      panels.pack(first, last + (trailing ? 1 : 0));
      if (halves) barrier.arrive_and_wait(end - begin);
      for (int64_t step = steps.begin; step < steps.end; ++step) {
        // In block_at's order: the leading half first at even steps, last at odd ones.
        const bool in_order = (step - steps.begin) % 2 == 0;
        const auto run_leading = [&] {
          if (leading) run_step(step, first - 1, first, half_rows, B, std::true_type());
        };
        const auto run_trailing = [&] {
          if (trailing) run_step(step, last, last + 1, 0, half_rows, std::true_type());
        };
        in_order ? run_leading() : run_trailing();
        if (last > first) run_step(step, first, last, 0, B, std::true_type());
        in_order ? run_trailing() : run_leading();
        barrier.arrive_and_wait(end - begin);
      }
    });
  }
  h_state.copy_(h_buffers[(steps.end - steps.begin) % 2]);
}

// Steps `steps` of the forward, from the state in h_state and c_state (which it updates); the
// kernels are chosen for the whole call (v.T_ steps), so that a call run in chunks of steps
// computes what it computes in one.
// With a step input (projects_input_in_steps), the panel schedule projects the input in its
// steps and xg is not read.
template <typename Cell, typename T>
void run_forward(const LayerView<T>& v, StepRange steps, bool zero_initial_state, StepRows<T> xg,
                 const Tensor& w_hh, const Tensor& step_bias, const Tensor& w_hr, Tensor& h_state,
                 Tensor& c_state, Tensor& output, Tensor& workspace,
                 const StepInput<T>& input = StepInput<T>()) {
  using A = at::opmath_type<T>;
  const int64_t B = v.B, H = v.H, P = v.P, G = v.G, W = v.W;
  const bool projecting = w_hr.defined();
  const bool saving = workspace.dim() > 1;  // [T, B, W] or [N, W] when saving, [0] otherwise
  if (runs_by_panels(v, projecting)) {
    if constexpr (Cell::kGates == 1) {  // the Elman cell's gate as two (run_forward_by_panels)
      if (H % 2 == 0) {
        run_forward_by_panels<Cell, T, 2>(v, steps, zero_initial_state, xg, input, w_hh, step_bias,
                                          h_state, c_state, output, workspace);
        return;
      }
    }
    run_forward_by_panels<Cell, T, Cell::kGates>(v, steps, zero_initial_state, xg, input, w_hh,
                                                 step_bias, h_state, c_state, output, workspace);
    return;
  }
  TORCH_INTERNAL_ASSERT(!input.defined(), "rnnfast: the input is projected in the panel schedule");
  Tensor h_unprojected = projecting ? at::empty({B, H}, h_state.options()) : Tensor();
  Tensor h_projected = projecting ? at::empty({B, P}, h_state.options()) : Tensor();
  using Product = RecurrentProduct<T>;
  // From zero states, a call of one step never multiplies by W_hh: its product is the bias
  // alone, a product of no terms ([G, 0]), which copies nothing. (A bfloat16 or float16
  // product copies W_hh into float; with that copy, the backward's, and layer.cpp's scan for
  // non-finite gate gradients, the course's one-step sine model in bfloat16 peaked at 1.33x
  // torch.nn's memory in its training step, 0.89x without.)
  const Tensor product_matrix = zero_initial_state && v.T_ == 1 ? w_hh.narrow(1, 0, 0) : w_hh;
  // hg = h W_hh^T + step_bias (b_hh, or b_ih + b_hh where xg has no bias). A product in the
  // BLAS would add the bias by copying it into every row of hg before each step's GEMM, a pass
  // over [B, G] on the calling thread while the others wait (5% of the 64-row, 256-unit LSTM's
  // forward); there the pointwise pass adds it instead, on each thread's rows while they are
  // in its cache. (float and double: the BLAS's own types, for which both round the same.)
  const bool bias_in_pointwise =
      (std::is_same_v<T, float> || std::is_same_v<T, double>) && step_bias.defined() &&
      !v.gate_packed &&
      Product::kernel_for(v.product_rows, G, product_matrix.size(1), v.T_) == Product::Kernel::Blas;
  const T* pointwise_bias = bias_in_pointwise ? step_bias.data_ptr<T>() : nullptr;
  // The forward may use MKL's packed copy of W_hh: its memory is gone before the backward,
  // whose gate-gradient buffers make the peak of a training step.
  const Product recurrent(product_matrix, bias_in_pointwise ? Tensor() : step_bias, v.product_rows,
                          v.T_, v.gate_packed ? Product::Packed::Output : Product::Packed::None,
                          v.unit_hidden, /*may_pack=*/true);
  // h = h_unprojected W_hr^T
  const Product projection(w_hr, Tensor(), v.product_rows, v.T_);

  T* h_data = h_state.data_ptr<T>();                                  // [B, P]
  A* c_data = Cell::kHasCellState ? c_state.data_ptr<A>() : nullptr;  // [B, H]
  T* out_data = output.data_ptr<T>();
  T* ws_data = saving && W > 0 ? workspace.data_ptr<T>() : nullptr;
  T* hu_data = projecting ? h_unprojected.data_ptr<T>() : nullptr;
  T* hp_data = projecting ? h_projected.data_ptr<T>() : nullptr;

  // A packed sequence's rows that have ended skip the product (their step reads no hg): a
  // seq2seq encoder's sentences of 3-10 words padded to 10 ran a third of its products on them.
  const bool products_skip_ended_rows = recurrent.runs_any_rows();
  // Where the product runs in the BLAS and the cell reads xg and hg only as their sum (LSTM,
  // Elman), the step's GEMM adds h W_hh^T into the step's rows of xg in place (any step's rows
  // are xg.batch apart), and the cell reads that sum as hg and the step bias (or zeros) as xg.
  // The GEMM reads the rows of xg as it goes, where the cells read them from memory after it
  // (no_grad forward of 64 rows, 100 steps, on a 2-core Xeon: 256 LSTM units 4-6% faster on 1
  // thread and the same on 2, 512 units 3.5% faster on 1 thread and 2% on 2).
  const bool sums_into_xg = (std::is_same_v<T, float> || std::is_same_v<T, double>) &&
                            Cell::kHiddenBiasFoldable && !projecting && !v.gate_packed &&
                            recurrent.uses_blas();
  const std::vector<T> zero_bias(sums_into_xg && !pointwise_bias ? G : 0, T(0));
  const T* sum_bias = pointwise_bias ? pointwise_bias : zero_bias.data();
  // A step's h W_hh^T [B, G], where it does not go into xg.
  Tensor hg = at::empty({sums_into_xg ? 0 : B, G}, h_state.options());
  T* hg_data = hg.data_ptr<T>();
  const auto recurrent_step = [&](int64_t step, int64_t b_begin, int64_t b_end) {
    // Every row active at the first step starts there; from zero states hg is step_bias alone
    // (and, summed into xg, nothing to add).
    const bool from_zero = zero_initial_state && step == 0;
    const int64_t end =
        products_skip_ended_rows ? v.active_end(v.step_time(step), b_begin, b_end) : b_end;
    if (end == b_begin) return;
    if (sums_into_xg) {
      if (from_zero) return;
      recurrent.run_into(h_data + b_begin * P, v.rows_of_products(b_begin, end),
                         const_cast<T*>(xg.row(v.step_time(step), b_begin)), xg.batch);
      return;
    }
    recurrent.run(from_zero ? nullptr : h_data + b_begin * P, v.rows_of_products(b_begin, end),
                  hg_data + b_begin * G);
  };
  const auto pointwise_step = [&](int64_t step, int64_t b_begin, int64_t b_end) {
    const int64_t t = v.step_time(step);
    // Each row's xg of the next step is fetched into the L2 cache as the row's cell runs: the
    // projection over all steps lies beyond it (64 rows of 64 LSTM units: 6.5 MB), and the
    // next step reads the row there (by its product or its cell). No_grad forward of 100 steps
    // on a 2-core Xeon, 1 thread: 64 rows of 64 LSTM units 4.12-4.17 -> 4.00-4.05 ms, 64 GRU
    // units 3.41-3.45 -> 3.33-3.34, fashion-MNIST's 128 rows of 30 LSTM units 0.785-0.789 ->
    // 0.756-0.761; on 2 threads 1-2% (256 units: the same).
    const bool fetches_next = !v.gate_packed && step + 1 < steps.end;
    const int64_t next_t = fetches_next ? v.step_time(step + 1) : t;
    for (int64_t b = b_begin; b < b_end; ++b) {
      // (A packed xg has no row for a row that has ended.)
      if (fetches_next && v.active(next_t, b)) prefetch_to_l2(xg.row(next_t, b), G);
      const int64_t row = t * B + b;
      const bool active = v.active(t, b);
      T* out_row = out_data + row * P;
      // A packed workspace has no rows for the rows that have ended.
      T* ws_row =
          ws_data && (active || !v.saved_rows_packed()) ? ws_data + v.saved_row(t, b) * W : nullptr;
      if (!active) {
        std::fill(out_row, out_row + P, T(0));
        if (ws_row) std::fill(ws_row, ws_row + W, T(0));
        continue;
      }
      // Where xg lives in the workspace or the output, the cell overwrites it in place: it
      // reads all gates of a unit before it writes any.
      const T* xg_row = sums_into_xg ? sum_bias : xg.row(t, b);
      T* hg_row = sums_into_xg ? const_cast<T*>(xg.row(t, b)) : hg_data + b * G;
      if (pointwise_bias && !sums_into_xg) {
        for_unit_runs<T>(G, [&](auto n, auto zero) {
          using V = decltype(zero);
          store(hg_row, 0, n, load<V>(hg_row, 0, n) + load<V>(pointwise_bias, 0, n));
        });
      }
      T* h_row = h_data + b * P;
      A* c_row = c_data ? c_data + b * H : nullptr;
      T* h_new_row = projecting ? hu_data + b * H : h_row;
      for_unit_runs<T>(H, [&](auto j, auto zero) {
        const auto h = forward_run<Cell>(static_cast<int>(H), j, zero, xg_row, hg_row, h_row, c_row,
                                         h_new_row, ws_row);
        if (!projecting) store(out_row, 0, j, h);
      });
      if (projecting && ws_row) {
        std::copy(h_new_row, h_new_row + H, ws_row + Cell::kSavedPerUnit * H);
      }
    }
  };
  const auto projection_step = [&](int64_t step, int64_t b_begin, int64_t b_end) {
    if (!projecting) return;
    // h = h_unprojected W_hr^T for the active rows; inactive rows keep their state.
    const int64_t t = v.step_time(step);
    projection.run(hu_data + b_begin * H, v.rows_of_products(b_begin, b_end),
                   hp_data + b_begin * P);
    for (int64_t b = b_begin; b < b_end; ++b) {
      if (!v.active(t, b)) continue;
      std::copy(hp_data + b * P, hp_data + (b + 1) * P, h_data + b * P);
      std::copy(hp_data + b * P, hp_data + (b + 1) * P, out_data + (t * B + b) * P);
    }
  };
  run_steps(B, steps.begin, steps.end, step_threads(B, v.T_, G, P, H, recurrent), recurrent_step,
            pointwise_step, projection_step);
}

// The panel schedule projects the input in its steps (x_t W_ih^T in the tiles of h W_hh^T, no
// GEMM over all steps and no xg [T, B, G] to write and read back) from this many batch rows: a
// tile then reads each panel's terms of W_ih for several rows, as the GEMM does. On 2 threads
// of a Xeon, no_grad forward of 100 steps of LSTM: 16 rows of 256 units 7.15-7.34 -> 6.58-6.72
// ms, 20 of 200 6.68-6.93 -> 5.88-6.11, 32 of 256 14.1-14.4 -> 13.3-13.5; the 200-unit word
// model's 4.95 -> 4.68 ms. On 1 thread 20 rows of 200 units 3-4% faster, 16 of 256 (panels of
// 2 MiB, that Xeon's L2 cache) 0-5% slower. 64 rows of 256 ran 2.5% slower than MKL's GEMM
// per step (panels_take_product's limit stays), and panels past the core's cache (16 rows of
// 384 units) 3% slower than the GEMM over all steps.
constexpr int64_t kStepProjectionMinRows = 8;

// Where the BLAS is not MKL on an Intel CPU (blas_is_fast_here), the panels project the input
// in the steps up to this many bytes of panels, past a core's L2 cache: their tiles, reading
// the panels from the L3 cache at every step, still run faster than MKL's GEMM over all steps,
// whose generic kernels reach 75-85% of an AMD core's multiply-add rate (85-98 of 115 GFLOP/s
// on one core of a Zen 4 EPYC, on the engine's shapes). (2-core AMD EPYC, Zen 4, L2 1 MiB per
// core, L3 32 MiB; LSTM forward under no_grad, 2 threads: 16 rows x 100 steps of 256 units
// (2 MiB of panels) 10.6 -> 9.3 ms, of 512 units (8 MiB) 41.8 -> 38.3, 64 rows of 256 41.9 ->
// 35.4, of 512 152 -> 143; training steps 3-7% faster, the Elman's forward of 64 rows of 512
// units 17%; 1 thread: 16 rows of 256 units 24.1 -> 18.8 ms, of 512 79.4 -> 72.4; 16 rows x
// 50 steps of 768 units (19 MB) 48.2 -> 43.6 ms; of 1024 units (34 MB, past the L3 cache) 79
// -> 100 ms: not taken.)
constexpr int64_t kStepProjectionMaxBytesBesideSlowBlas = int64_t(20) << 20;

// The largest panels of [W_ih | W_hh], in bytes, whose steps project the input: a core's L2
// cache (so that on two threads each thread's share fits in half of its own, read from there at
// every step), or more beside a slow BLAS (above).
int64_t step_projection_max_panel_bytes() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (!blas_is_fast_here()) {
    return std::max(core_cache_bytes(), kStepProjectionMaxBytesBesideSlowBlas);
  }
#endif
  return core_cache_bytes();
}

// Whether the forward projects the input [T, B, I] in its steps (StepInput): in the panel
// schedule (runs_by_panels; from kStepProjectionMinRows rows, a product the BLAS would run),
// for a cell that reads xg and hg only as their sum, with no bias of the input's own to add
// (adds_input_bias: b_ih without b_hh), on rows of unit stride, where the panels of
// [W_ih | W_hh] are at most step_projection_max_panel_bytes. Not in tiles that run their gates
// in two passes (GatePanels::splits_gates: the LSTM with AVX2), whose tiles of W_hh after the
// GEMM over all steps ran as fast or faster (2-core AMD EPYC, Zen 3, in one process, no_grad
// forward; 1 thread: 16 rows x 100 steps of 512 units 114 -> 88 ms, 32 rows of 256 units 56.2
// -> 50.0, 64 rows of 512 units 414 -> 356, 20 rows x 35 steps of 650 units, two layers, 183 ->
// 160; 2 threads: 8-16 rows of 256-512 units the same to 8% faster, 20-64 rows of 200-650 units
// 10% slower to 10% faster; training steps 5% slower to 14% faster). The rule does not depend on
// the thread count: a call sums each output in the same order on any number of threads.
template <typename Cell, typename T>
bool projects_input_in_steps(const LayerView<T>& v, bool projecting, const Tensor& input,
                             bool adds_input_bias) {
  const int64_t panel_bytes = (input.size(2) + v.H) * v.G * int64_t(sizeof(T));
  return Cell::kHiddenBiasFoldable && !GatePanels<T>::splits_gates(Cell::kGates) &&
         !adds_input_bias && input.stride(2) == 1 && v.product_rows >= kStepProjectionMinRows &&
         panel_bytes <= step_projection_max_panel_bytes() && runs_by_panels(v, projecting);
}

// An inference call's input projection in chunks of this many bytes (at least kMinChunkSteps
// steps): large enough that a chunk's GEMM runs at the rate of one over all steps and that the
// per-call preparation of the step kernels, repeated per chunk (W_hh packed), stays small next
// to the chunk's steps.
constexpr int64_t kProjectionChunkBytes = int64_t(32) << 20;
// Only a projection past this many bytes is chunked: the two chunks of the 64-row, 512-unit
// LSTM's 100 steps (52 MB whole) ran its forward 10% slower than one GEMM.
constexpr int64_t kChunkedProjectionAbove = int64_t(64) << 20;
constexpr int64_t kMinChunkSteps = 16;

int64_t projection_chunk_steps(int64_t step_bytes) {
  return std::max<int64_t>(kMinChunkSteps,
                           kProjectionChunkBytes / std::max<int64_t>(1, step_bytes));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(
    c10::string_view cell, const Tensor& input_, const std::optional<Tensor>& hx_,
    const std::optional<Tensor>& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
    const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
    const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& lengths_, bool reverse,
    bool save_workspace, bool batch_first) {
  const LayerArgs args = LayerArgs::of(cell, input_, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_,
                                       lengths_, reverse, batch_first)
                             .time_major();
  const ForwardInputs in = prepare_forward(
      args, save_workspace ? training_reads_input_at_strides : inference_reads_input_at_strides);
  const LayerSizes& s = in.sizes;
  const Tensor &input = in.input, &w_ih = in.w_ih, &w_hh = in.w_hh, &w_hr = in.w_hr;
  const Tensor& lengths = in.lengths;
  const int64_t ws_cols = workspace_width(s.kind, s.hidden_size, s.has_projection);
  // A packed sequence's workspace keeps the rows that are active at each step only
  // (LayerView::saved_rows_before): the speech model's utterances of 100-200 frames padded to
  // 200 left a quarter of it padding. Not where its rows come from a GEMM per batch row (a
  // batch-major input) or are read by one over all rows (the projection's weight gradient).
  const int64_t packed_rows = save_workspace && ws_cols > 0 && s.has_lengths && !s.has_projection &&
                                      !is_batch_major(input) && rows_by_length(lengths)
                                  ? packed_row_count(lengths, s.steps)
                                  : 0;
  ForwardState state = make_forward_state(s, args, save_workspace, packed_rows);
  Tensor &output = state.output, &h_state = state.h, &c_state = state.c;
  Tensor& workspace = state.workspace;

  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, input.scalar_type(), "rnnfast_forward_cpu", [&] {
          const Tensor b_ih = contiguous_or_undefined(args.b_ih);
          const Tensor b_hh = contiguous_or_undefined(args.b_hh);
#if defined(RNNFAST_LANE_KERNELS)
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (register_layer_reads_input(s, input)) {
              register_layer::with_narrowest_lanes(
                  s.batch * s.hidden_size, s.batch * s.input_size, [&](auto lanes_type) {
                    register_layer::forward<Cell, decltype(lanes_type)>(
                        register_layer_sizes(s, reverse), strided_steps(input),
                        w_ih.data_ptr<float>(), w_hh.data_ptr<float>(), data_or_null<float>(b_ih),
                        data_or_null<float>(b_hh), h_state.data_ptr<float>(),
                        Cell::kHasCellState ? c_state.data_ptr<float>() : nullptr,
                        output.data_ptr<float>(),
                        save_workspace && ws_cols > 0 ? workspace.data_ptr<float>() : nullptr);
                  });
              return;
            }
          }
#endif
          auto v = make_view<scalar_t>(s, ws_cols, reverse, lengths);
          if (workspace.dim() == 2) v.pack_saved_rows();
          // Without hx the first step's product h0 W_hh^T is skipped where that changes nothing.
          const bool zero_initial_state = !s.has_initial_state && w_hh_all_finite<scalar_t>(w_hh);
          const bool packs_gates = v.gate_packed && Cell::kGates > 1;
          // A batch-major input (see input_layout.h): under no_grad its projection xg is
          // batch-major too, in a buffer of its own; in training it goes time-major into the
          // workspace or the output as usual, by a GEMM per batch row.
          const bool batch_major_input = is_batch_major(input);
          const bool batch_major = !save_workspace && projects_batch_major_input(s, input);
          const bool xg_in_output =
              !batch_major && !packs_gates && Cell::kGates == 1 && s.state_size == s.gate_size;
          // The biases are added by the recurrent product of each step, where that costs nothing
          // extra: b_ih + b_hh for the cells that see xg and hg only as their sum, else b_hh, and
          // then b_ih goes into xg (a copy into every row before the GEMM).
          const bool fold_biases = Cell::kHiddenBiasFoldable && b_ih.defined() && b_hh.defined();
          const scalar_t* xg_bias =
              b_ih.defined() && !fold_biases ? b_ih.data_ptr<scalar_t>() : nullptr;
          const Tensor step_bias = fold_biases ? summed_biases<scalar_t>(b_ih, b_hh) : b_hh;
          const scalar_t* x_data = input.data_ptr<scalar_t>();
          const MatrixRef<scalar_t> w_ih_t{w_ih.data_ptr<scalar_t>(), s.input_size, true};
          // xg = x W_ih^T (+ beta xg) for steps t0 .. t0 + count - 1 into rows t * B + b of
          // xg_data (row stride xg_stride), from time-major rows in one GEMM, or from batch-major
          // ones (row (b, t) at b * T + t) in a GEMM per batch row.
          const auto project_time_major = [&](int64_t t0, int64_t count, scalar_t beta,
                                              scalar_t* xg_data, int64_t xg_stride) {
            if (batch_major_input) {
              at::parallel_for(0, s.batch, 1, [&](int64_t b_begin, int64_t b_end) {
                for (int64_t b = b_begin; b < b_end; ++b) {
                  gemm<scalar_t>(count, s.gate_size, s.input_size,
                                 {x_data + (b * s.steps + t0) * s.input_size, s.input_size, false},
                                 w_ih_t, beta, xg_data + b * xg_stride, s.batch * xg_stride,
                                 GemmThreads::OnCaller);
                }
              });
            } else {
              gemm<scalar_t>(count * s.batch, s.gate_size, s.input_size,
                             {x_data + t0 * s.batch * s.input_size, s.input_size, false}, w_ih_t,
                             beta, xg_data, xg_stride);
            }
          };
          // The same for a packed sequence's steps (rows by length), on the rows that are active
          // only: they are gathered step after step into [N, I] (N: the steps' active rows), the
          // GEMM writes their xg into the first N rows of xg, and each row then moves to its
          // place (row t * B + b), the last first, so that none is overwritten before it moves.
          // A padded row's xg is never read. (The chatbot encoder's sentences of 3-10 words of
          // 10 leave a third of the rows padding.) packed: xg is a packed workspace's, whose rows
          // stay where the GEMM writes them. Only for a GEMM of kGatherMinWork multiply-adds or
          // more (the gathering measured on those: the chatbot encoder's).
          constexpr int64_t kGatherMinWork = 1 << 20;
          const auto project_steps = [&](int64_t t0, int64_t count, scalar_t beta,
                                         scalar_t* xg_data, int64_t xg_stride, bool packed) {
            std::vector<int64_t> active(count);
            int64_t rows = 0;
            for (int64_t t = 0; t < count; ++t) {
              active[t] = v.active_end(t0 + t, 0, s.batch);
              rows += active[t];
            }
            const bool pays = packed || (!batch_major_input && v.rows_by_length &&
                                         8 * rows <= 7 * count * s.batch &&
                                         rows * s.input_size * s.gate_size >= kGatherMinWork);
            if (!pays || rows == count * s.batch) {
              project_time_major(t0, count, beta, xg_data, xg_stride);
              return;
            }
            Tensor gathered = pooled_empty({rows, s.input_size}, input.options());
            scalar_t* to = gathered.data_ptr<scalar_t>();
            for (int64_t t = 0; t < count; ++t) {
              const scalar_t* from = x_data + (t0 + t) * s.batch * s.input_size;
              to = std::copy(from, from + active[t] * s.input_size, to);
            }
            gemm<scalar_t>(rows, s.gate_size, s.input_size,
                           {gathered.data_ptr<scalar_t>(), s.input_size, false}, w_ih_t, beta,
                           xg_data, xg_stride);
            if (packed) return;
            for (int64_t t = count - 1; t >= 0; --t) {
              rows -= active[t];  // the step's first row in the GEMM's output
              for (int64_t b = active[t] - 1; b >= 0 && rows != t * s.batch; --b) {
                const scalar_t* from = xg_data + (rows + b) * xg_stride;
                std::copy(from, from + s.gate_size, xg_data + (t * s.batch + b) * xg_stride);
              }
            }
          };
          if (projects_input_in_steps<Cell>(v, s.has_projection, input, xg_bias != nullptr)) {
            const StepInput<scalar_t> step_input{w_ih, x_data, input.stride(0), input.stride(1)};
            run_forward<Cell, scalar_t>(v, StepRange{0, s.steps}, zero_initial_state,
                                        StepRows<scalar_t>{nullptr, 0, 0}, w_hh, step_bias, w_hr,
                                        h_state, c_state, output, workspace, step_input);
            return;
          }
          const int64_t chunk_steps =
              projection_chunk_steps(s.batch * s.gate_size * int64_t(sizeof(scalar_t)));
          const int64_t projection_bytes =
              s.steps * s.batch * s.gate_size * int64_t(sizeof(scalar_t));
          if (!save_workspace && !packs_gates && !xg_in_output && s.steps > chunk_steps &&
              projection_bytes > kChunkedProjectionAbove) {
            // Under no_grad a long call's input projection is not held whole ([T, B, G], several
            // times the output): it is made a chunk of steps at a time, [steps, B, G] time-major,
            // just before the steps that read it.
            Tensor chunk = pooled_empty({chunk_steps * s.batch, s.gate_size}, input.options());
            scalar_t* chunk_data = chunk.data_ptr<scalar_t>();
            for (int64_t first = 0; first < s.steps; first += chunk_steps) {
              const StepRange steps{first, std::min(s.steps, first + chunk_steps)};
              const int64_t count = steps.end - steps.begin;
              const int64_t t0 = reverse ? s.steps - steps.end : steps.begin;  // the chunk's times
              const int64_t rows = count * s.batch;
              const scalar_t beta = copy_addend_rows<scalar_t>(rows, s.gate_size, xg_bias, 0,
                                                               chunk_data, s.gate_size);
              project_steps(t0, count, beta, chunk_data, s.gate_size, /*packed=*/false);
              const StepRows<scalar_t> xg_rows{chunk_data, s.batch * s.gate_size, s.gate_size, t0};
              run_forward<Cell, scalar_t>(v, steps, zero_initial_state, xg_rows, w_hh, step_bias,
                                          w_hr, h_state, c_state, output, workspace);
            }
            return;
          }
          // xg = x W_ih^T + b_ih: [T * B, G], time-major (from a batch-major input by a GEMM per
          // batch row), or under no_grad in a batch-major input's order (one GEMM; see
          // projects_batch_major_input).
          // To save a [T, B, G] buffer it is computed straight into the columns of the workspace
          // (LSTM, GRU: their saved gates take its place) or of the output (Elman: h takes its
          // place); the gate-packed view permutes it, so there it gets its own buffer, as do
          // batch-major rows.
          Tensor xg;
          if (batch_major) {
            xg = pooled_empty({s.steps * s.batch, s.gate_size}, input.options());
          } else if (!packs_gates && save_workspace && Cell::kSavedPerUnit >= Cell::kGates) {
            xg = workspace.view({-1, ws_cols}).narrow(1, 0, s.gate_size);
          } else if (xg_in_output) {
            xg = output.view({s.steps * s.batch, s.state_size});
          } else {
            xg = pooled_empty({s.steps * s.batch, s.gate_size}, input.options());
          }
          const int64_t rows = xg.size(0), xg_stride = xg.stride(0);
          // xg in a packed workspace: its rows are packed too.
          const bool packed_xg = v.saved_rows_packed() && xg.data_ptr() == workspace.data_ptr();
          scalar_t* xg_data = xg.data_ptr<scalar_t>();
          const scalar_t beta =
              copy_addend_rows<scalar_t>(rows, s.gate_size, xg_bias, 0, xg_data, xg_stride);
          if (batch_major) {
            // [B * T, G] batch-major, as the rows come.
            gemm<scalar_t>(rows, s.gate_size, s.input_size, {x_data, s.input_size, false}, w_ih_t,
                           beta, xg_data, xg_stride);
          } else {
            project_steps(0, s.steps, beta, xg_data, xg_stride, packed_xg);
          }
          Tensor step_gates = xg;
          if (packs_gates) {
            step_gates = regroup_gates<scalar_t>(xg.view({s.steps, s.batch, s.gate_size}),
                                                 Cell::kGates, /*to_packed=*/true);
          }
          const int64_t row_stride = step_gates.stride(0);
          const StepRows<scalar_t> xg_rows{step_gates.data_ptr<scalar_t>(),
                                           v.gate_packed ? v.G
                                           : batch_major ? row_stride
                                                         : s.batch * row_stride,
                                           batch_major ? s.steps * row_stride : row_stride, 0,
                                           packed_xg ? v.saved_rows_before.data() : nullptr};
          run_forward<Cell, scalar_t>(v, StepRange{0, s.steps}, zero_initial_state, xg_rows, w_hh,
                                      step_bias, w_hr, h_state, c_state, output, workspace);
        });
  });
  return {swap_time_and_batch(output, batch_first), h_state, final_cell_state(s, state, input),
          returned_workspace(s, workspace)};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
