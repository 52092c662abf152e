// The CPU engine's layer with cell options (csrc/cells.h, "Cell options"): layer
// normalisation, zoneout and recurrent dropout, rnnfast::forward_with_options and
// rnnfast::backward_with_options (csrc/layer_options.h).
//
// The same engine as forward.cpp / backward.cpp in a plainer form: the input projection of all
// steps as one GEMM (normalised per row where asked), then per step the recurrent product of
// the (dropped-out) state, the normalisation of its rows, the cell, the projection and zoneout;
// the backward runs the steps in reverse and takes the weights' gradients as GEMMs and sums over
// all steps at the end. float and double (the Python side runs bfloat16 and float16 in float).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../buffer_pool.h"
#include "../cells.h"
#include "../layer_options.h"
#include "../parallel_rows.h"
#include "blas.h"
#include "capability.h"
#include "gate_panels.h"
#include "kernels.h"
#include "layer_norm_rows.h"
#include "recurrent_product.h"
#include "schedule.h"
#include "vector_math.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace {

using at::Tensor;

// A step's rows run on the threads in shares of at least this many gate values (below, the
// parallel region costs more than it saves). Every schedule but RowsPerThread splits them so:
// a row's cell with its options (normalisations, zoneout) costs several times the plain cell's,
// and the plain engine's rule (split from 4096 hidden units per step) kept the 20-row, 200-unit
// layer-normalised LSTM's and GRU's cells on one thread while the other waited (2-core AMD EPYC:
// their training steps 12-13% faster split, smaller shapes the same).
constexpr int64_t kValuesPerThreadTask = 1 << 12;

template <typename Fn>
void for_rows(int64_t rows, int64_t values_per_row, const Fn& fn) {
  for_row_shares(rows, values_per_row, kValuesPerThreadTask, fn);
}

template <typename T>
const T* data_if(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// One call's sizes and arguments as the loops read them.
template <typename T>
struct Call {
  const LayerOptionsArgs& args;
  int64_t steps, batch, input_size, hidden_size, state_size, gate_size;
  const int64_t* lengths;  // [B] or nullptr
  // The zoneout masks of h [T, B, P] and of c [T, B, H], or nullptr without them (inference).
  const T *h_zoneout_mask, *c_zoneout_mask;

  Call(const LayerOptionsArgs& a, int64_t gates)
      : args(a),
        steps(a.input.size(0)),
        batch(a.input.size(1)),
        input_size(a.input.size(2)),
        hidden_size(a.w_ih.size(0) / gates),
        state_size(a.w_hh.size(1)),
        gate_size(a.w_ih.size(0)),
        lengths(a.lengths.defined() ? a.lengths.data_ptr<int64_t>() : nullptr),
        h_zoneout_mask(a.zoneout_mask.defined() ? a.zoneout_mask.data_ptr<T>() : nullptr),
        c_zoneout_mask(a.zoneout_cell_mask.defined() ? a.zoneout_cell_mask.data_ptr<T>()
                                                     : nullptr) {}

  int64_t time(int64_t step) const { return args.reverse ? steps - 1 - step : step; }
  bool active(int64_t t, int64_t b) const { return lengths == nullptr || t < lengths[b]; }
  // Row b's row of a zoneout mask [T, B, width] at time t, or nullptr without a mask.
  const T* zoneout_row(const T* mask, int64_t t, int64_t b, int64_t width) const {
    return mask ? mask + (t * batch + b) * width : nullptr;
  }
};

// The zoneout keep values of units j (a run, as for_unit_runs gives them): the mask row's, or
// the probability p for every unit (inference's expectation).
template <typename V, typename T, typename Index>
V keep_values(const T* mask_row, T p, Index j) {
  return mask_row ? load<V>(mask_row, 0, j) : V(p);
}

// to = zoneout(keep, previous, candidate) over a row of n units, keep from mask_row (or p where
// it is nullptr); to may be candidate.
template <typename T>
void zoneout_units(int64_t n, const T* mask_row, T p, const T* previous, const T* candidate,
                   T* to) {
  for_unit_runs<T>(n, [&](auto j, auto zero) {
    using V = decltype(zero);
    store(
        to, 0, j,
        zoneout(keep_values<V>(mask_row, p, j), load<V>(previous, 0, j), load<V>(candidate, 0, j)));
  });
}

// The sums over all steps' rows that the normalisations' parameters and the biases take as
// gradients (a gain's dy * x_hat, a bias's dy; dy the gradient of what the bias is added to),
// taken in the reverse loop while each row's gradients are in the L1 cache rather than in
// passes over [T * B, G] buffers after it. (The passes took 4% of the CPU time of the 16-row,
// 64-unit layer-normalised LSTM's training step; the step in all takes about 2% less.)
//
// Each batch row adds its steps into its own float sums, which go into its double totals
// every kStepsPerFlush steps; after the loop the rows' totals are added in row order. A sum so
// runs in the same order on any number of threads, and in double beyond a few dozen terms.
constexpr int64_t kStepsPerFlush = 64;

// Where each sum lies in a row of ParameterSums (-1: not taken). The LSTM's and Elman's b_hh take
// b_ih's sums (their dxg is dhg).
struct ParameterSumsLayout {
  int64_t gain_ih = -1, gain_hh = -1, bias_ih = -1, bias_hh = -1, gain_c = -1, bias_c = -1;
  int64_t width = 0;

  int64_t take(bool wanted, int64_t n) {
    if (!wanted) return -1;
    width += n;
    return width - n;
  }
};

template <typename T>
class ParameterSums {
 public:
  // steps: the most steps a row adds.
  ParameterSums(const ParameterSumsLayout& layout, int64_t rows, int64_t steps,
                const at::TensorOptions& options)
      : layout_(layout),
        rows_(rows),
        running_(zeros_by_memset({rows, layout.width}, options)),
        running_data_(running_.data_ptr<T>()),
        // Made here, where no other thread can see them: rows on different threads flush at
        // once. Only for a call whose rows may flush: most calls run fewer steps than one flush
        // takes, and zeroing the totals cost microseconds a call.
        totals_(steps >= kStepsPerFlush ? rows * layout.width : 0, 0.0),
        steps_since_flush_(rows, 0) {}

  // Row b's sum at offset (nullptr where not taken).
  T* row_sum(int64_t b, int64_t offset) {
    return offset < 0 ? nullptr : running_data_ + b * layout_.width + offset;
  }

  // Row b has added one more step.
  void step_done(int64_t b) {
    if (++steps_since_flush_[b] == kStepsPerFlush) flush(b);
  }

  // The sums at offset [n] over all rows, after the loop: per row its total (none in a call too
  // short to flush) plus what it has added since its last flush, the rows in order.
  Tensor total(int64_t offset, int64_t n) const {
    std::vector<double> sums(n, 0.0);
    for (int64_t b = 0; b < rows_; ++b) {
      const T* running = running_data_ + b * layout_.width + offset;
      const double* total = totals_.empty() ? nullptr : totals_.data() + b * layout_.width + offset;
      for (int64_t k = 0; k < n; ++k) sums[k] += (total ? total[k] : 0.0) + double(running[k]);
    }
    Tensor out = at::empty({n}, running_.options());
    std::copy(sums.begin(), sums.end(), out.data_ptr<T>());
    return out;
  }

 private:
  void flush(int64_t b) {
    T* running = running_data_ + b * layout_.width;
    double* total = totals_.data() + b * layout_.width;
    for (int64_t k = 0; k < layout_.width; ++k) total[k] += double(running[k]);
    std::fill(running, running + layout_.width, T(0));
    steps_since_flush_[b] = 0;
  }

  ParameterSumsLayout layout_;
  int64_t rows_;
  Tensor running_;  // [rows, width]
  T* running_data_;
  std::vector<double> totals_;  // [rows, width], or empty where no row flushes
  std::vector<int64_t> steps_since_flush_;
};

// sum += row over n values (sum may be nullptr: nothing).
template <typename T>
void add_row(int64_t n, const T* row, T* sum) {
  if (sum == nullptr) return;
  for_unit_runs<T>(n, [&](VectorUnits j, Vec<T>) {
    store(sum, 0, j, load<Vec<T>>(sum, 0, j) + load<Vec<T>>(row, 0, j));
  });
}

template <typename Cell, typename T>
LayerOptionsResult forward_impl(const LayerOptionsArgs& args, bool save) {
  using A = T;
  const Call<T> c(args, Cell::kGates);
  const int64_t Tn = c.steps, B = c.batch, I = c.input_size, H = c.hidden_size, P = c.state_size,
                G = c.gate_size, S = Cell::kSavedPerUnit;
  const auto options = args.input.options();
  const bool projecting = args.w_hr.defined();
  const bool norm_cell = Cell::kHasCellState && args.norm_cell_weight.defined();
  const bool zoneout_h = args.zoneout_mask.defined() || args.zoneout > 0;
  const bool zoneout_c = args.zoneout_cell_mask.defined() || args.zoneout_cell > 0;
  const bool normalising =
      args.norm_ih_weight.defined() || args.norm_hh_weight.defined() || norm_cell;

  LayerOptionsResult r;
  r.output = pooled_empty({Tn, B, P}, options);
  // A packed sequence's rows write nothing at the steps they do not run; the backward's sums
  // over all rows read those places, so they start at zero.
  const auto saved_or_empty = [&](bool wanted, at::IntArrayRef sizes) {
    if (!save || !wanted) return at::empty({0}, options);
    Tensor t = pooled_empty(sizes, options);
    return c.lengths ? t.zero_() : t;
  };
  r.cell_saved = saved_or_empty(S > 0, {Tn, B, S * H});
  r.h_prev = saved_or_empty(true, {Tn, B, P});
  r.c_prev = saved_or_empty(Cell::kHasCellState, {Tn, B, H});
  // The cell's h: Elman's backward reads act' from it, the projection's gradient reads it.
  r.h_cell = saved_or_empty(S == 0 || projecting, {Tn, B, H});
  r.norm_hh = saved_or_empty(args.norm_hh_weight.defined(), {Tn, B, G});
  r.norm_cell = saved_or_empty(norm_cell, {Tn, B, H});
  r.rstd = saved_or_empty(normalising, {Tn, B, 3});

  const bool norm_hh = args.norm_hh_weight.defined();
  // The cells that see xg and hg only as their sum take b_ih + b_hh in the per-step product
  // where no normalisation comes between: no copy of b_ih into every row of xg before its GEMM.
  const bool fold_biases = Cell::kHiddenBiasFoldable && !args.norm_ih_weight.defined() &&
                           !norm_hh && args.b_ih.defined() && args.b_hh.defined();
  // xg = x W_ih^T + b_ih, or x W_ih^T alone where it is normalised or b_ih is folded. [T * B, G]
  const Tensor x = args.input.reshape({Tn * B, I});
  // (From the pool: a fresh buffer of this size costs a page fault per page, each call.)
  Tensor xg = pooled_empty({Tn * B, G}, options);
  T* xg_data = xg.data_ptr<T>();
  {
    // The engine's GEMM (blas.h), as the plain forward's projection: a small one on the calling
    // thread (the one-step projection of 16 rows of 64 units took 14 us in ATen, 11 here).
    const bool adds_b_ih = !args.norm_ih_weight.defined() && args.b_ih.defined() && !fold_biases;
    const Tensor b_ih_rows = adds_b_ih ? args.b_ih.contiguous() : Tensor();
    const T beta = copy_addend_rows<T>(Tn * B, G, adds_b_ih ? b_ih_rows.data_ptr<T>() : nullptr, 0,
                                       xg_data, G);
    gemm<T>(Tn * B, G, I, matrix_ref<T>(x), matrix_ref<T>(args.w_ih.t()), beta, xg_data, G);
  }
  // Each row of xg is normalised in the time loop, just before its cell reads it; its normal
  // form, which the backward reads, takes its place in xg. Where hg is normalised too and the
  // cell reads xg and hg only as their sum (LSTM, Elman), the two normalised rows' sum goes
  // into hg's row and the cell reads a row of zeros as xg (the 16-row, 64-unit LSTM's training
  // step about 1% faster than with a row of its own for each); otherwise xg's goes into a row
  // of xg_affine [B, G].
  const bool norm_ih = args.norm_ih_weight.defined();
  const bool norms_summed = Cell::kHiddenBiasFoldable && norm_ih && norm_hh;
  Tensor xg_affine = norm_ih && !norms_summed ? at::empty({B, G}, options) : Tensor();
  // [G] zeros: xg where the sums go into hg, and the bias of a row without one.
  Tensor zero_gates = norms_summed ? zeros_by_memset({G}, options) : Tensor();
  r.norm_ih = save && norm_ih ? xg.view({Tn, B, G}) : at::empty({0}, options);

  using Product = RecurrentProduct<T>;
  // hg = h_in W_hh^T + b_hh (+ b_ih where folded), or h_in W_hh^T alone where the
  // normalisation adds b_hh after it.
  const Tensor step_bias = norm_hh ? Tensor() : fold_biases ? args.b_ih.add(args.b_hh) : args.b_hh;
  const Product recurrent(args.w_hh, step_bias, B, Tn);
  const Product projection(args.w_hr, Tensor(), B, Tn);

  // The state before and after each step (each run of rows swaps its own pointers per step),
  // the product's input and output.
  Tensor h_buffers = at::empty({2, B, P}, options);
  // (Zero states filled in place, as zeros_by_memset's, not copied from a tensor of zeros.)
  const auto set_initial = [](Tensor& buffers, const Tensor& state) {
    if (state.defined()) {
      buffers[0].copy_(state);
    } else {
      std::fill_n(buffers.data_ptr<T>(), buffers.size(1) * buffers.size(2), T(0));
    }
  };
  set_initial(h_buffers, args.hx);
  Tensor c_buffers = Cell::kHasCellState ? at::empty({2, B, H}, options) : Tensor();
  if (Cell::kHasCellState) set_initial(c_buffers, args.cx);
  const bool dropping = args.recurrent_mask.defined();
  Tensor h_in = dropping ? at::empty({B, P}, options) : Tensor();
  Tensor hg = at::empty({B, G}, options);
  Tensor h_cell = at::empty({B, H}, options);  // the cell's h, before projection and zoneout
  Tensor h_candidate = projecting ? at::empty({B, P}, options) : h_cell;
  const int64_t saved_width = std::max<int64_t>(S, 1) * H;
  Tensor scratch_saved = at::empty({B, saved_width}, options);

  const T* mask = data_if<T>(args.recurrent_mask);
  const T* gain_ih = data_if<T>(args.norm_ih_weight);
  const T* b_ih = data_if<T>(args.b_ih);
  const T* gain_hh = data_if<T>(args.norm_hh_weight);
  const T* b_hh = data_if<T>(args.b_hh);
  const T* gain_c = data_if<T>(args.norm_cell_weight);
  const T* bias_c = data_if<T>(args.norm_cell_bias);
  T* out = r.output.data_ptr<T>();
  T* hg_data = hg.data_ptr<T>();
  T* hc_data = h_cell.data_ptr<T>();
  T* hcand_data = h_candidate.data_ptr<T>();
  // The saved tensors (or nullptr where not saved), read once: data_ptr checks the type.
  T* cell_saved = save && S > 0 ? r.cell_saved.data_ptr<T>() : nullptr;
  T* scratch = scratch_saved.data_ptr<T>();
  T* xg_affine_data = xg_affine.defined() ? xg_affine.data_ptr<T>() : nullptr;
  const T* zeros = norms_summed ? zero_gates.data_ptr<T>() : nullptr;
  T* norm_hh_saved = save && norm_hh ? r.norm_hh.data_ptr<T>() : nullptr;
  T* norm_cell_saved = save && norm_cell ? r.norm_cell.data_ptr<T>() : nullptr;
  T* rstd_saved = save && normalising ? r.rstd.data_ptr<T>() : nullptr;
  T* h_cell_saved = save && (S == 0 || projecting) ? r.h_cell.data_ptr<T>() : nullptr;
  T* h_prev_saved = save ? r.h_prev.data_ptr<T>() : nullptr;
  T* c_prev_saved = save && Cell::kHasCellState ? r.c_prev.data_ptr<T>() : nullptr;
  T* h_in_data = dropping ? h_in.data_ptr<T>() : nullptr;

  // The product goes to the gate panels where the plain forward's would (panels_take_product):
  // W_hh packed once per call, where the BLAS repacked W_hh at every step (the training steps of
  // 20 rows of 200 GRU units with recurrent dropout and of 16 rows of 256 LSTM units with zoneout
  // 5% and 9% faster on a 2-core AMD EPYC). The choice does not depend on the thread count, so
  // neither do the results. The panels run on each thread's rows where the schedule runs rows
  // per thread (a core's cache holds W_hh: step_threads), else split over the threads per step
  // (on a 2-core Xeon the training steps of 20 x 200 and 16 x 256 layers with options run 0-7%
  // faster in panels on each thread's rows than in the BLAS there, which ran 7-13% faster than
  // the panels split per step).
  std::optional<GatePanels<T>> panels;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (!projecting && panels_take_product<T>(B, G, P, Tn)) {
      panels.emplace(args.w_hh.contiguous(), step_bias, Cell::kGates);
      panels->pack_all();
    }
  }
#endif
  const bool rows_per_thread =
      step_threads(B, Tn, G, P, H, recurrent) == StepThreads::RowsPerThread &&
      (!projecting || projection.may_split_rows());
  // Whether the panels' tiles may split their terms into partial sums: not where the schedule
  // may run rows per thread, whose shares must sum each row as the whole batch does.
  const bool split_terms = splits_panel_terms<T>(B);
  // hg [B, G] = h_rows [B, P] W_hh^T + step_bias at the loop's step `step`.
  const auto step_product = [&](const T* h_rows, int64_t b0, int64_t rows, int64_t step) {
    if (!panels) {
      recurrent.run(h_rows + b0 * P, rows, hg_data + b0 * G);
      return;
    }
    panels->template product<Cell::kGates>(h_rows + b0 * P, rows, hg_data + b0 * G, G, step,
                                           split_terms);
  };

  // The cell of row b at time t, from h_prev_row (and c_prev_row) into h_cell and c_new_row.
  const auto cell_row = [&](int64_t t, int64_t b, const T* hp_row, A* cp_row, A* cn_row) {
    const int64_t row = t * B + b;
    T* const xg_row = xg_data + row * G;
    T* const hg_row = hg_data + b * G;
    // xg = LN(x W_ih^T) * gain_ih + b_ih, its normal form over x W_ih^T; hg = LN(h W_hh^T) *
    // gain_hh + b_hh in place (with norms_summed, xg + hg there). Both rows together where
    // both are normalised (their sums overlap: 1-2% of the 64-unit layers' training step).
    T* affine_row = xg_affine_data ? xg_affine_data + b * G : nullptr;
    const NormRow<T> ih_row{xg_row, gain_ih, b_ih, affine_row, save ? xg_row : nullptr};
    const NormRow<T> hh_row{hg_row, gain_hh, b_hh, hg_row,
                            norm_hh_saved ? norm_hh_saved + row * G : nullptr};
    T rstd[2] = {T(0), T(0)};
    if (norms_summed) {
      layer_norm_rows_into_sum<T>(
          G, {xg_row, gain_ih, b_ih ? b_ih : zeros, nullptr, ih_row.normalized},
          {hg_row, gain_hh, b_hh ? b_hh : zeros, nullptr, hh_row.normalized}, hg_row, rstd);
    } else if (norm_ih && norm_hh) {
      layer_norm_rows<T, 2>(G, {ih_row, hh_row}, rstd);
    } else if (norm_ih) {
      rstd[0] = layer_norm_row<T>(G, ih_row);
    } else if (norm_hh) {
      rstd[1] = layer_norm_row<T>(G, hh_row);
    }
    if (rstd_saved) {
      if (norm_ih) rstd_saved[row * 3] = rstd[0];
      if (norm_hh) rstd_saved[row * 3 + 1] = rstd[1];
    }
    // The cell's xg.
    const T* const cell_xg = norms_summed ? zeros : affine_row ? affine_row : xg_row;
    T* saved = cell_saved ? cell_saved + row * S * H : scratch + b * saved_width;
    T* hc_row = hc_data + b * H;
    if constexpr (Cell::kHasCellState) {
      if (norm_cell) {
        for_unit_runs<T>(H, [&](auto j, auto zero) {
          using V = decltype(zero);
          V o = zero;
          store(cn_row, 0, j,
                Cell::cell_state(static_cast<int>(H), j, cell_xg, hg_row, load<V>(cp_row, 0, j), o,
                                 saved));
        });
        // c_out = LN(c) * gain_c + bias_c into saved[4H]: the backward's act(c_out).
        const A value =
            layer_norm_row<T>(H, {cn_row, gain_c, bias_c, saved + 4 * H,
                                  norm_cell_saved ? norm_cell_saved + row * H : nullptr});
        if (rstd_saved) rstd_saved[row * 3 + 2] = value;
        for_unit_runs<T>(H, [&](auto j, auto zero) {
          using V = decltype(zero);
          store(hc_row, 0, j, Cell::hidden(load<V>(saved, 3 * H, j), load<V>(saved, 4 * H, j)));
        });
      } else {
        for_unit_runs<T>(H, [&](auto j, auto zero) {
          using V = decltype(zero);
          V h = zero, c_value = zero;
          Cell::forward(static_cast<int>(H), j, cell_xg, hg_row, zero, load<V>(cp_row, 0, j), h,
                        c_value, saved);
          store(hc_row, 0, j, h);
          store(cn_row, 0, j, c_value);
        });
      }
      if (zoneout_c) {
        zoneout_units<T>(H, c.zoneout_row(c.c_zoneout_mask, t, b, H), T(args.zoneout_cell), cp_row,
                         cn_row, cn_row);
      }
    } else {
      for_unit_runs<T>(H, [&](auto j, auto zero) {
        using V = decltype(zero);
        V h = zero, unused = zero;
        Cell::forward(static_cast<int>(H), j, cell_xg, hg_row, load<V>(hp_row, 0, j), zero, h,
                      unused, saved);
        store(hc_row, 0, j, h);
      });
    }
    if (h_cell_saved) std::copy(hc_row, hc_row + H, h_cell_saved + row * H);
  };

  // The new h of row b from its candidate (projected): zoneout, the output, the state.
  const auto finish_row = [&](int64_t t, int64_t b, const T* hp_row, T* hn_row) {
    const T* cand = hcand_data + b * P;
    T* out_row = out + (t * B + b) * P;
    if (zoneout_h) {
      zoneout_units<T>(P, c.zoneout_row(c.h_zoneout_mask, t, b, P), T(args.zoneout), hp_row, cand,
                       hn_row);
    } else {
      std::copy(cand, cand + P, hn_row);
    }
    std::copy(hn_row, hn_row + P, out_row);
  };

  // All steps of rows b0 .. b1 - 1; the cells of a step's rows split over the threads
  // (for_rows: within a thread's run of rows per thread, on that thread).
  const auto run_rows = [&](int64_t b0, int64_t b1) {
    T* h_old = h_buffers.data_ptr<T>();
    T* h_new = h_old + B * P;
    A* c_old = Cell::kHasCellState ? c_buffers.data_ptr<A>() : nullptr;
    A* c_new = Cell::kHasCellState ? c_old + B * H : nullptr;
    const int64_t rows = b1 - b0;
    for (int64_t step = 0; step < Tn; ++step) {
      const int64_t t = c.time(step);
      if (h_prev_saved) {
        std::copy(h_old + b0 * P, h_old + b1 * P, h_prev_saved + (t * B + b0) * P);
      }
      if (c_prev_saved) {
        std::copy(c_old + b0 * H, c_old + b1 * H, c_prev_saved + (t * B + b0) * H);
      }
      const T* product_input = h_old;
      if (dropping) {
        T* in = h_in_data + b0 * P;
        const T* h_rows = h_old + b0 * P;
        for (int64_t n = 0; n < rows * P; ++n) in[n] = h_rows[n] * mask[b0 * P + n];
        product_input = h_in_data;
      }
      step_product(product_input, b0, rows, step);
      // Each row's xg of the next step is fetched into the L2 cache as the row's cell runs (as
      // the plain forward's, forward.cpp): the normalisation's passes read it next step.
      const T* next_xg = step + 1 < Tn ? xg_data + c.time(step + 1) * B * G : nullptr;
      const auto cells = [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (next_xg) prefetch_to_l2(next_xg + b * G, G);
          if (!c.active(t, b)) {
            // The row keeps its state and writes a zero output.
            std::copy(h_old + b * P, h_old + (b + 1) * P, h_new + b * P);
            if (c_old) std::copy(c_old + b * H, c_old + (b + 1) * H, c_new + b * H);
            std::fill(hc_data + b * H, hc_data + (b + 1) * H, T(0));
            std::fill(out + (t * B + b) * P, out + (t * B + b + 1) * P, T(0));
            // (The saved normal forms are zero there, as the other saved tensors are.)
            if (save && norm_ih)
              std::fill(xg_data + (t * B + b) * G, xg_data + (t * B + b + 1) * G, T(0));
            continue;
          }
          cell_row(t, b, h_old + b * P, c_old ? c_old + b * H : nullptr,
                   c_new ? c_new + b * H : nullptr);
          if (!projecting) finish_row(t, b, h_old + b * P, h_new + b * P);
        }
      };
      for_rows(rows, G, [&](int64_t begin, int64_t end) { cells(b0 + begin, b0 + end); });
      if (projecting) {
        projection.run(hc_data + b0 * H, rows, hcand_data + b0 * P);
        for (int64_t b = b0; b < b1; ++b) {
          if (c.active(t, b)) finish_row(t, b, h_old + b * P, h_new + b * P);
        }
      }
      std::swap(h_old, h_new);
      std::swap(c_old, c_new);
    }
  };
  if (rows_per_thread) {
    at::parallel_for(0, B, 1, run_rows);
  } else {
    run_rows(0, B);
  }
  // After T swaps the final state is in buffer T % 2.
  const auto final_state = [&](const Tensor& buffers, int64_t width) {
    Tensor state = at::empty({B, width}, options);
    std::copy_n(buffers.data_ptr<T>() + (Tn % 2) * B * width, B * width, state.data_ptr<T>());
    return state;
  };
  r.h_n = final_state(h_buffers, P);
  r.c_n = Cell::kHasCellState ? final_state(c_buffers, H) : at::empty({0}, options);
  return r;
}

template <typename Cell, typename T>
std::vector<Tensor> backward_impl(const LayerOptionsBackwardArgs& ba) {
  using A = T;
  const LayerOptionsArgs& args = ba.layer;
  const Call<T> c(args, Cell::kGates);
  const int64_t Tn = c.steps, B = c.batch, I = c.input_size, H = c.hidden_size, P = c.state_size,
                G = c.gate_size, S = Cell::kSavedPerUnit;
  const auto options = args.input.options();
  const bool projecting = args.w_hr.defined();
  const bool norm_ih = args.norm_ih_weight.defined(), norm_hh = args.norm_hh_weight.defined();
  const bool norm_cell = Cell::kHasCellState && args.norm_cell_weight.defined();
  const bool zoneout_h = args.zoneout_mask.defined() || args.zoneout > 0;
  const bool zoneout_c = args.zoneout_cell_mask.defined() || args.zoneout_cell > 0;
  const bool dropping = args.recurrent_mask.defined();
  // Per-step buffers over all steps: every row writes its places at the steps it runs; a
  // packed sequence's rows leave the others, which the sums after the loop read, at zero.
  const auto steps_buffer = [&](int64_t width) {
    Tensor t = pooled_empty({Tn * B, width}, options);
    return c.lengths ? t.zero_() : t;
  };

  // Gradients of the gates per step, [T * B, G]: dxg of xg (after its normalisation, which each
  // reverse step then turns into the gradient of x W_ih^T before it), dhg of
  // hg where the cell's differ, and dhg_raw of h W_hh^T before hg's normalisation. dhg_raw has
  // a buffer of its own where hg is normalised, or where dhg is dxg and xg's normalisation
  // changes dxg in place.
  Tensor dxg = steps_buffer(G);
  Tensor dhg = Cell::kSeparateHiddenGateGrad ? steps_buffer(G) : dxg;
  const bool own_dhg_raw = norm_hh || (norm_ih && dhg.is_same(dxg));
  Tensor dhg_raw = own_dhg_raw ? steps_buffer(G) : dhg;
  Tensor dh_candidate_steps = projecting ? steps_buffer(P) : Tensor();

  // The normalisations' parameter gradients and the biases' are summed in the loop. (Column
  // sums of dxg and dhg after it made the 16-row, 64-unit layers' training step with zoneout
  // 3% (LSTM) to 7% (GRU) slower.)
  const bool sums_in_loop = norm_ih || norm_hh || norm_cell || ba.has_bias;
  ParameterSumsLayout layout;
  layout.gain_ih = layout.take(norm_ih, G);
  layout.gain_hh = layout.take(norm_hh, G);
  layout.bias_ih = layout.take(ba.has_bias, G);
  layout.bias_hh = layout.take(ba.has_bias && !dhg.is_same(dxg), G);
  layout.gain_c = layout.take(norm_cell, H);
  layout.bias_c = layout.take(norm_cell && ba.has_norm_cell_bias, H);
  ParameterSums<T> parameter_sums(layout, sums_in_loop ? B : 0, Tn, options);

  // dLoss/dh and dLoss/dc of the state each step leaves, carried back step by step.
  Tensor dh_carry = ba.grad_h_n.defined() ? ba.grad_h_n.clone() : zeros_by_memset({B, P}, options);
  Tensor dc_carry = Cell::kHasCellState ? (ba.grad_c_n.defined() ? ba.grad_c_n.clone()
                                                                 : zeros_by_memset({B, H}, options))
                                        : Tensor();
  Tensor dh_candidate = at::empty({B, P}, options);  // of the step's h before zoneout
  Tensor dh_cell = projecting ? at::empty({B, H}, options) : dh_candidate;  // before projection
  Tensor dh_in = at::empty({B, P}, options);      // of the product's input h_prev * mask
  Tensor dh_direct = at::empty({B, H}, options);  // GRU: of h_prev through z
  // Per row: dc of the new cell state, then with norm_cell dc through the normalisation and
  // dLoss/dc_out.
  Tensor dc_scratch = at::empty({B, 3, H}, options);

  using Product = RecurrentProduct<T>;
  const Product recurrent_back(args.w_hh.t(), Tensor(), B, Tn);
  const Product projection_back(projecting ? args.w_hr.t() : Tensor(), Tensor(), B, Tn);

  // Rows of grad_output at its strides over t and b.
  const T* grad_out = ba.grad_output.data_ptr<T>();
  const int64_t grad_out_step = ba.grad_output.stride(0), grad_out_batch = ba.grad_output.stride(1);
  const T* mask = data_if<T>(args.recurrent_mask);
  const T* gain_ih = data_if<T>(args.norm_ih_weight);
  const T* gain_hh = data_if<T>(args.norm_hh_weight);
  const T* gain_c = data_if<T>(args.norm_cell_weight);
  const T* saved_all = data_if<T>(ba.cell_saved);
  const T* h_prev_all = ba.h_prev.data_ptr<T>();
  const T* c_prev_all = Cell::kHasCellState ? ba.c_prev.data_ptr<T>() : nullptr;
  const T* h_cell_all = ba.h_cell.numel() > 0 ? ba.h_cell.data_ptr<T>() : nullptr;
  const T* norm_ih_all = data_if<T>(ba.norm_ih);
  const T* norm_hh_all = data_if<T>(ba.norm_hh);
  const T* norm_cell_all = data_if<T>(ba.norm_cell);
  const T* rstd_all = ba.rstd.numel() > 0 ? ba.rstd.data_ptr<T>() : nullptr;
  T* dxg_data = dxg.data_ptr<T>();
  T* dhg_data = dhg.data_ptr<T>();
  T* dhg_raw_data = dhg_raw.data_ptr<T>();
  T* dhc = dh_carry.data_ptr<T>();
  A* dcc = Cell::kHasCellState ? dc_carry.data_ptr<A>() : nullptr;
  T* dcand = dh_candidate.data_ptr<T>();
  T* dcell = dh_cell.data_ptr<T>();
  T* din = dh_in.data_ptr<T>();
  T* ddirect = dh_direct.data_ptr<T>();
  T* dc_scratch_data = dc_scratch.data_ptr<T>();
  T* dh_candidate_steps_data = projecting ? dh_candidate_steps.data_ptr<T>() : nullptr;

  // dgates W_hh in gate panels where the engine's backward runs it there (backward_panels),
  // on any number of threads, as the forward's product.
  const std::optional<GatePanels<T>> back_panels = backward_panels<T>(args.w_hh, B, Tn);
  const bool split_terms = splits_panel_terms<T>(B);
  const bool rows_per_thread =
      backward_step_threads(B, Tn, G, P, H, recurrent_back, back_panels && !split_terms) ==
          StepThreads::RowsPerThread &&
      (!projecting || projection_back.may_split_rows());

  // The reverse step of row b at time t: the cell's and the normalisations' backward.
  const auto cell_row = [&](int64_t t, int64_t b) {
    const int64_t row = t * B + b;
    const T* saved = saved_all ? saved_all + row * S * H : nullptr;
    T* dxg_row = dxg_data + row * G;
    T* dhg_row = dhg_data + row * G;
    const T* dh_row = dcell + b * H;
    if constexpr (Cell::kHasCellState) {
      A* dc_row = dcc + b * H;
      const T* c_prev_row = c_prev_all + row * H;
      const T* mask_row = c.zoneout_row(c.c_zoneout_mask, t, b, H);
      // dc_row: dLoss/dc of the step's state, split by zoneout into what reaches c_prev
      // directly (kept in dc_row) and the new cell state's share (dc_new).
      T* dc_new = dc_scratch_data + b * 3 * H;
      for_unit_runs<T>(H, [&](auto j, auto zero) {
        using V = decltype(zero);
        const V d = load<V>(dc_row, 0, j);
        V to_prev = zero, to_new = d;
        if (zoneout_c) {
          zoneout_backward(keep_values<V>(mask_row, T(args.zoneout_cell), j), d, to_prev, to_new);
        }
        store(dc_row, 0, j, to_prev);
        store(dc_new, 0, j, to_new);
      });
      if (norm_cell) {
        // dLoss/dc_out through h, then through the normalisation into dc.
        T* dc_out = dc_new + 2 * H;
        for_unit_runs<T>(H, [&](auto j, auto zero) {
          using V = decltype(zero);
          store(
              dc_out, 0, j,
              Cell::output_backward(static_cast<int>(H), j, saved, load<V>(dh_row, 0, j), dxg_row));
        });
        T* dc_through_norm = dc_new + H;
        layer_norm_row_backward<T>(
            H,
            {dc_out, norm_cell_all + row * H, rstd_all[row * 3 + 2], gain_c, dc_through_norm,
             parameter_sums.row_sum(b, layout.gain_c), parameter_sums.row_sum(b, layout.bias_c)});
        for_unit_runs<T>(H, [&](auto j, auto zero) {
          using V = decltype(zero);
          V dc_prev = zero;
          Cell::state_backward(static_cast<int>(H), j, saved, load<V>(c_prev_row, 0, j),
                               load<V>(dc_new, 0, j) + load<V>(dc_through_norm, 0, j), dxg_row,
                               dc_prev);
          store(dc_row, 0, j, load<V>(dc_row, 0, j) + dc_prev);
        });
      } else {
        for_unit_runs<T>(H, [&](auto j, auto zero) {
          using V = decltype(zero);
          V dc_prev = zero, unused = zero;
          Cell::backward(static_cast<int>(H), j, saved, zero, load<V>(c_prev_row, 0, j),
                         load<V>(dh_row, 0, j), load<V>(dc_new, 0, j), dxg_row, dhg_row, dc_prev,
                         unused);
          store(dc_row, 0, j, load<V>(dc_row, 0, j) + dc_prev);
        });
      }
    } else {
      const T* h_prev_row = h_prev_all + row * P;
      // Elman reads act' from its output, the cell's h (before zoneout).
      const T* cell_saved = S > 0 ? saved : h_cell_all + row * H;
      T* direct_row = ddirect + b * H;
      for_unit_runs<T>(H, [&](auto j, auto zero) {
        using V = decltype(zero);
        V unused = zero, direct = zero;
        Cell::backward(static_cast<int>(H), j, cell_saved, load<V>(h_prev_row, 0, j), zero,
                       load<V>(dh_row, 0, j), zero, dxg_row, dhg_row, unused, direct);
        store(direct_row, 0, j, direct);
      });
    }
    if (!sums_in_loop) return;
    // The normalisations' backward: hg's into dhg_raw, xg's in place (dhg may be dxg: the pair
    // computes both from it before it stores either; alone, hg's runs first).
    T* bias_hh_sum = parameter_sums.row_sum(b, layout.bias_hh);
    T* bias_ih_sum = parameter_sums.row_sum(b, layout.bias_ih);
    // (Made only where the normalisation is: the pointers into its saved rows.)
    const auto hh_grad = [&] {
      return NormGradRow<T>{
          dhg_row,    norm_hh_all + row * G,  rstd_all[row * 3 + 1],
          gain_hh,    dhg_raw_data + row * G, parameter_sums.row_sum(b, layout.gain_hh),
          bias_hh_sum};
    };
    const auto ih_grad = [&] {
      return NormGradRow<T>{dxg_row,           norm_ih_all + row * G,
                            rstd_all[row * 3], gain_ih,
                            dxg_row,           parameter_sums.row_sum(b, layout.gain_ih),
                            bias_ih_sum};
    };
    if (norm_hh && norm_ih) {
      layer_norm_rows_backward<T>(G, hh_grad(), ih_grad());
    } else {
      if (norm_hh) {
        layer_norm_row_backward<T>(G, hh_grad());
      } else {
        add_row<T>(G, dhg_row, bias_hh_sum);
        if (own_dhg_raw) std::copy(dhg_row, dhg_row + G, dhg_raw_data + row * G);
      }
      if (norm_ih) {
        layer_norm_row_backward<T>(G, ih_grad());
      } else {
        add_row<T>(G, dxg_row, bias_ih_sum);
      }
    }
    parameter_sums.step_done(b);
  };

  // All reverse steps of rows b0 .. b1 - 1; the cells of a step's rows as the forward's.
  const auto run_rows = [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    for (int64_t step = Tn - 1; step >= 0; --step) {
      const int64_t t = c.time(step);
      // dh of the step's new h (its output and the next step's carry), split by zoneout
      // between h_prev (kept in the carry) and the candidate.
      for (int64_t b = b0; b < b1; ++b) {
        T* cand = dcand + b * P;
        if (!c.active(t, b)) {
          std::fill(cand, cand + P, T(0));
          continue;
        }
        const T* go = grad_out + t * grad_out_step + b * grad_out_batch;
        T* carry = dhc + b * P;
        const T* mask_row = c.zoneout_row(c.h_zoneout_mask, t, b, P);
        for_unit_runs<T>(P, [&](auto j, auto zero) {
          using V = decltype(zero);
          const V d = load<V>(go, 0, j) + load<V>(carry, 0, j);
          V to_prev = zero, to_candidate = d;
          if (zoneout_h) {
            zoneout_backward(keep_values<V>(mask_row, T(args.zoneout), j), d, to_prev,
                             to_candidate);
          }
          store(carry, 0, j, to_prev);
          store(cand, 0, j, to_candidate);
        });
      }
      if (projecting) {
        std::copy(dcand + b0 * P, dcand + b1 * P, dh_candidate_steps_data + (t * B + b0) * P);
        projection_back.run(dcand + b0 * P, rows, dcell + b0 * H);
      }
      const auto cells = [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (c.active(t, b)) cell_row(t, b);
        }
      };
      for_rows(rows, G, [&](int64_t begin, int64_t end) { cells(b0 + begin, b0 + end); });
      if (back_panels) {
        back_panels->template product<kBackwardPanelGates>(dhg_raw_data + (t * B + b0) * G, rows,
                                                           din + b0 * P, P, step, split_terms);
      } else {
        recurrent_back.run(dhg_raw_data + (t * B + b0) * G, rows, din + b0 * P);
      }
      // The carry into the previous step: the product's share through the dropout mask, and
      // GRU's z * h_prev.
      for (int64_t b = b0; b < b1; ++b) {
        if (!c.active(t, b)) continue;
        T* carry = dhc + b * P;
        const T* from_product = din + b * P;
        const T* mask_row = mask ? mask + b * P : nullptr;
        const T* direct_row = ddirect + b * H;
        for_unit_runs<T>(P, [&](auto j, auto zero) {
          using V = decltype(zero);
          V d = load<V>(from_product, 0, j);
          if (mask_row) d = d * load<V>(mask_row, 0, j);
          if (Cell::kReadsPrevHidden) d = d + load<V>(direct_row, 0, j);
          store(carry, 0, j, load<V>(carry, 0, j) + d);
        });
      }
    }
  };
  if (rows_per_thread) {
    at::parallel_for(0, B, 1, run_rows);
  } else {
    run_rows(0, B);
  }

  // The weights' gradients over all steps: GEMMs and column sums in an order fixed by the
  // shape (weight_gradients.cpp), so the same on any number of threads.
  const GradientKernels& kernels = kCpuGradientKernels;
  std::vector<Tensor> grads(kLayerOptionsGradients);
  Tensor h_in_steps = ba.h_prev.reshape({Tn * B, P});
  if (dropping) {
    Tensor masked = pooled_empty({Tn, B, P}, options);
    at::mul_out(masked, ba.h_prev, args.recurrent_mask);
    h_in_steps = masked.view({Tn * B, P});
  }
  grads[kGradWhh] = kernels.product(dhg_raw.t(), h_in_steps);
  if (projecting) {
    grads[kGradWhr] = kernels.product(dh_candidate_steps.t(), ba.h_cell.view({Tn * B, H}));
  }
  if (norm_ih) grads[kGradNormIh] = parameter_sums.total(layout.gain_ih, G);
  if (norm_hh) grads[kGradNormHh] = parameter_sums.total(layout.gain_hh, G);
  if (ba.has_bias) {
    grads[kGradBih] = parameter_sums.total(layout.bias_ih, G);
    // (A copy where the sums are b_ih's: two parameters' gradients must not share storage.)
    grads[kGradBhh] =
        layout.bias_hh >= 0 ? parameter_sums.total(layout.bias_hh, G) : grads[kGradBih].clone();
  }
  if (norm_cell) {
    grads[kGradNormCellWeight] = parameter_sums.total(layout.gain_c, H);
    if (ba.has_norm_cell_bias) grads[kGradNormCellBias] = parameter_sums.total(layout.bias_c, H);
  }
  grads[kGradWih] = kernels.product(dxg.t(), args.input.view({Tn * B, I}));
  if (ba.input_grad) {
    Tensor grad_input = pooled_empty({Tn * B, I}, options);
    kernels.matmul(grad_input, dxg, args.w_ih, /*accumulate=*/false);
    grads[kGradInput] = grad_input.view({Tn, B, I});
  }
  grads[kGradHx] = dh_carry;
  if (Cell::kHasCellState) grads[kGradCx] = dc_carry;
  return grads;
}

}  // namespace

LayerOptionsResult forward_with_options_cpu(const LayerOptionsArgs& args, bool save) {
  return dispatch_cell(args.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    return AT_DISPATCH_FLOATING_TYPES(args.input.scalar_type(), "rnnfast_forward_with_options",
                                      [&] { return forward_impl<Cell, scalar_t>(args, save); });
  });
}

std::vector<Tensor> backward_with_options_cpu(const LayerOptionsBackwardArgs& args) {
  return dispatch_cell(args.layer.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    return AT_DISPATCH_FLOATING_TYPES(args.layer.input.scalar_type(),
                                      "rnnfast_backward_with_options",
                                      [&] { return backward_impl<Cell, scalar_t>(args); });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
