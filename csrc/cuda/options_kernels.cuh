// The CUDA engine's kernels of the layer with cell options (csrc/cells.h, "Cell options":
// layer normalisation, zoneout, recurrent dropout), run by options_engine.cu around ATen's
// GEMMs. Per forward step, after hg = (h * mask) W_hh^T: ONE row kernel (one block per batch
// row) that layer-normalises the row's xg and hg, runs the cell on every unit, normalises the
// LSTM's cell state, applies zoneout and writes the state, the output and what the backward
// reads (the tensors of csrc/layer_options.h, as the CPU engine lays them out). With a
// projection, ATen's h_cell W_hr^T and then a small element kernel (zoneout, output). The
// backward per step: an element kernel (zoneout's split of dLoss/dh), ATen's dh W_hr, ONE row
// kernel (the cell's and the normalisations' backward), ATen's dgates W_hh and an element kernel
// that adds it to the carried gradient.
//
// A row's layer normalisation is a block reduction: each thread sums its strided share of the
// row, the block adds the partial sums in shared memory (block_sum); the per-element formulas are
// cells.h's, which the CPU engine's row functions use too. Every loop over a row's elements
// starts at BlockThreads::first() and steps by BlockThreads::stride(), the same assignment in
// every loop, so a thread reads back only what it wrote itself unless a barrier is between; a
// host-emulated block is one thread that runs every index.
//
// No torch header here (launchers.cuh): nvcc alone compiles this file.
#pragma once

#include <cstdint>

#include "../cells.h"
#include "launch.cuh"
#include "sequence_kernels.cuh"
#include "step_kernels.cuh"
#include "types.cuh"

namespace rnnfast {
namespace cuda {

// The row kernels' threads per block: a power of two (block_sum halves it).
constexpr int kRowThreads = 256;
static_assert((kRowThreads & (kRowThreads - 1)) == 0, "block_sum needs a power of two");

// The sum over the block of every thread's `partial`, returned to every thread; `partials`:
// [kRowThreads] of shared memory. Every thread of the block calls it.
template <typename A>
RNNFAST_HD A block_sum(A partial, A* partials) {
  const int64_t me = BlockThreads::first(), threads = BlockThreads::stride();
  partials[me] = partial;
  BlockThreads::sync();
  for (int64_t half = threads / 2; half > 0; half /= 2) {
    if (me < half) partials[me] += partials[me + half];
    BlockThreads::sync();
  }
  const A total = partials[0];
  BlockThreads::sync();  // every thread has read it before a later sum writes there
  return total;
}

// y = LN(x) * gain + bias over a row of n values (bias may be nullptr), the normal forms into
// `normalized` (or nullptr); y may be x. Returns 1 / sqrt(var + eps). Starts and ends with a
// barrier: x may have been written by any thread, y is read by any.
template <typename A, typename T>
RNNFAST_HD A block_layer_norm(int64_t n, const T* x, const T* gain, const T* bias, T* y,
                              T* normalized, A* partials) {
  const int64_t first = BlockThreads::first(), stride = BlockThreads::stride();
  BlockThreads::sync();
  A sum = A(0);
  for (int64_t k = first; k < n; k += stride) sum += A(x[k]);
  const A mean = block_sum(sum, partials) / A(n);
  A squares = A(0);
  for (int64_t k = first; k < n; k += stride) {
    const A centred = A(x[k]) - mean;
    squares += centred * centred;
  }
  const A rstd = layer_norm_rstd(block_sum(squares, partials), static_cast<int>(n));
  for (int64_t k = first; k < n; k += stride) {
    const A x_hat = layer_norm_normal_form(A(x[k]), mean, rstd);
    if (normalized != nullptr) normalized[k] = T(x_hat);
    y[k] = T(layer_norm_affine(x_hat, A(gain[k]), bias != nullptr ? A(bias[k]) : A(0)));
  }
  BlockThreads::sync();
  return rstd;
}

// dLoss/dx of block_layer_norm from dy and what it kept (normalized, rstd); dx may be dy. The
// gain's and bias's gradients are sums over rows, left to the host code. Barriers as above.
template <typename A, typename T>
RNNFAST_HD void block_layer_norm_backward(int64_t n, const T* dy, const T* normalized, A rstd,
                                          const T* gain, T* dx, A* partials) {
  const int64_t first = BlockThreads::first(), stride = BlockThreads::stride();
  BlockThreads::sync();
  A sum_g = A(0), sum_g_x_hat = A(0);
  for (int64_t k = first; k < n; k += stride) {
    const A g = A(dy[k]) * A(gain[k]);
    sum_g += g;
    sum_g_x_hat += g * A(normalized[k]);
  }
  const A mean_g = block_sum(sum_g, partials) / A(n);
  const A mean_g_x_hat = block_sum(sum_g_x_hat, partials) / A(n);
  for (int64_t k = first; k < n; k += stride) {
    dx[k] = T(
        layer_norm_input_grad(A(dy[k]) * A(gain[k]), A(normalized[k]), mean_g, mean_g_x_hat, rstd));
  }
  BlockThreads::sync();
}

// Zoneout's keep value of unit k: the mask row's (training), or p (inference's expectation).
template <typename T>
RNNFAST_HD AccType<T> keep_value(const T* mask_row, T p, int64_t k) {
  return AccType<T>(mask_row != nullptr ? mask_row[k] : p);
}

// ---------------------------------------------------------------------------------------------
// Forward. "This step" pointers point at row 0 of time t ([B, columns]); the saved tensors'
// pointers are nullptr where the forward does not save them.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct OptionsForwardArgs {
  int64_t B, H, P, G;
  int64_t steps, t;
  const int64_t* lengths;  // [B] on the device, or nullptr
  T* xg;                   // [B, G] this step's x W_ih^T (+ b_ih without norm_ih); normalised here
  T* hg;  // [B, G] (h_prev * mask) W_hh^T (+ b_hh without norm_hh); normalised here
  const T *gain_ih, *bias_ih;  // [G] norm_ih_weight and b_ih with norm_ih; else nullptr
  const T *gain_hh, *bias_hh;  // [G] likewise for hg
  const T *gain_c, *bias_c;    // [H] LSTM's norm_cell_weight (or nullptr), norm_cell_bias
  const T* h_prev;             // [B, P] the state the step starts from
  const AccType<T>* c_prev;    // [B, H] LSTM, else nullptr
  T* h_next;                   // [B, P] the state after the step (without projection)
  AccType<T>* c_next;          // [B, H] LSTM, else nullptr
  T* h_cell;                   // [B, H] the cell's h (the projection's input); zero when inactive
  T* out;                      // [B, P] this step's output
  T* saved;                    // [B, saved_width]: cell_saved of this step, or a scratch
  int64_t saved_width;         // S * H, or max(S, 1) * H for the scratch
  const T* zoneout_h_mask;     // [B, P] this step's, or nullptr
  const T* zoneout_c_mask;     // [B, H] this step's, or nullptr
  T zoneout_h, zoneout_c;      // p, read without a mask
  bool zoneout_h_on, zoneout_c_on;
  bool projecting;                                     // the h_candidate kernel finishes the step
  T *h_prev_saved, *c_prev_saved, *h_cell_saved;       // [B, P], [B, H], [B, H] this step
  T *norm_ih_saved, *norm_hh_saved, *norm_cell_saved;  // [B, G], [B, G], [B, H]
  T* rstd_saved;                                       // [B, 3]
};

// Block b: row b of one forward step.
template <typename Cell, typename T>
RNNFAST_HD void options_forward_row(const OptionsForwardArgs<T>& a, int64_t b,
                                    AccType<T>* partials) {
  using A = AccType<T>;
  const int64_t H = a.H, P = a.P, G = a.G;
  const int64_t first = BlockThreads::first(), stride = BlockThreads::stride();
  const T* hp = a.h_prev + b * P;
  T* hn = a.h_next + b * P;
  const A* cp = Cell::kHasCellState ? a.c_prev + b * H : nullptr;
  A* cn = Cell::kHasCellState ? a.c_next + b * H : nullptr;
  T* hc = a.h_cell + b * H;
  T* out = a.out + b * P;
  if (a.h_prev_saved != nullptr) {
    for (int64_t k = first; k < P; k += stride) a.h_prev_saved[b * P + k] = hp[k];
  }
  if (a.c_prev_saved != nullptr) {
    for (int64_t j = first; j < H; j += stride) a.c_prev_saved[b * H + j] = T(cp[j]);
  }
  if (a.t >= length_of(a.lengths, b, a.steps)) {
    // The row keeps its state and writes a zero output (its saved values stay zero).
    for (int64_t k = first; k < P; k += stride) {
      hn[k] = hp[k];
      out[k] = T(A(0));
    }
    for (int64_t j = first; j < H; j += stride) {
      if (Cell::kHasCellState) cn[j] = cp[j];
      hc[j] = T(A(0));
    }
    return;
  }
  T* xg = a.xg + b * G;
  T* hg = a.hg + b * G;
  T* rstd = a.rstd_saved != nullptr ? a.rstd_saved + b * 3 : nullptr;
  if (a.gain_ih != nullptr) {
    const A value =
        block_layer_norm<A>(G, xg, a.gain_ih, a.bias_ih, xg,
                            a.norm_ih_saved ? a.norm_ih_saved + b * G : nullptr, partials);
    if (rstd != nullptr && first == 0) rstd[0] = T(value);
  }
  if (a.gain_hh != nullptr) {
    const A value =
        block_layer_norm<A>(G, hg, a.gain_hh, a.bias_hh, hg,
                            a.norm_hh_saved ? a.norm_hh_saved + b * G : nullptr, partials);
    if (rstd != nullptr && first == 0) rstd[1] = T(value);
  }
  T* saved = a.saved + b * a.saved_width;
  const int cell_H = static_cast<int>(H);
  if constexpr (Cell::kHasCellState) {
    if (a.gain_c != nullptr) {
      // c = f * c_prev + i * g; then c_out = LN(c) * gain_c + bias_c into saved[4H] (the
      // backward's act(c_out)) and h = o * act(c_out), o from saved[3H].
      for (int64_t j = first; j < H; j += stride) {
        A o = A(0);
        cn[j] = Cell::cell_state(cell_H, static_cast<int>(j), xg, hg, cp[j], o, saved);
      }
      const A value =
          block_layer_norm<A>(H, cn, a.gain_c, a.bias_c, saved + 4 * H,
                              a.norm_cell_saved ? a.norm_cell_saved + b * H : nullptr, partials);
      if (rstd != nullptr && first == 0) rstd[2] = T(value);
      for (int64_t j = first; j < H; j += stride) {
        hc[j] = T(Cell::hidden(A(saved[3 * H + j]), A(saved[4 * H + j])));
      }
    } else {
      for (int64_t j = first; j < H; j += stride) {
        A h = A(0), c = A(0);
        Cell::forward(cell_H, static_cast<int>(j), xg, hg, A(0), cp[j], h, c, saved);
        hc[j] = T(h);
        cn[j] = c;
      }
    }
    if (a.zoneout_c_on) {
      const T* mask = a.zoneout_c_mask ? a.zoneout_c_mask + b * H : nullptr;
      for (int64_t j = first; j < H; j += stride) {
        cn[j] = zoneout(keep_value(mask, a.zoneout_c, j), cp[j], cn[j]);
      }
    }
  } else {
    for (int64_t j = first; j < H; j += stride) {
      A h = A(0), unused = A(0);
      Cell::forward(cell_H, static_cast<int>(j), xg, hg, A(hp[j]), A(0), h, unused, saved);
      hc[j] = T(h);
    }
  }
  if (a.h_cell_saved != nullptr) {
    for (int64_t j = first; j < H; j += stride) a.h_cell_saved[b * H + j] = hc[j];
  }
  if (!a.projecting) {
    // P == H: the candidate is the cell's h, unit k's written by this very thread.
    const T* mask = a.zoneout_h_mask ? a.zoneout_h_mask + b * P : nullptr;
    for (int64_t k = first; k < P; k += stride) {
      const A candidate = A(hc[k]);
      const A h = a.zoneout_h_on ? zoneout(keep_value(mask, a.zoneout_h, k), A(hp[k]), candidate)
                                 : candidate;
      hn[k] = T(h);
      out[k] = T(h);
    }
  }
}

// With a projection: the step's new h of active rows from h_candidate = h_cell W_hr^T.
template <typename T>
struct OptionsProjectionArgs {
  int64_t B, P, steps, t;
  const int64_t* lengths;
  const T* h_candidate;     // [B, P] this step
  const T* h_prev;          // [B, P]
  T* h_next;                // [B, P]
  T* out;                   // [B, P] this step's
  const T* zoneout_h_mask;  // [B, P] this step's, or nullptr
  T zoneout_h;
  bool zoneout_h_on;
};

// Thread `index` = b * P + k.
template <typename T>
RNNFAST_HD void options_projection_unit(const OptionsProjectionArgs<T>& a, int64_t index) {
  using A = AccType<T>;
  const int64_t b = index / a.P, k = index - b * a.P;
  if (a.t >= length_of(a.lengths, b, a.steps)) return;  // the row kernel kept its state
  const A candidate = A(a.h_candidate[index]);
  const T* mask = a.zoneout_h_mask ? a.zoneout_h_mask + b * a.P : nullptr;
  const A h = a.zoneout_h_on
                  ? zoneout(keep_value(mask, a.zoneout_h, k), A(a.h_prev[index]), candidate)
                  : candidate;
  a.h_next[index] = T(h);
  a.out[index] = T(h);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// dLoss/dh of the step's new h (its output's gradient and the carry from the later steps),
// split by zoneout between h_prev (kept in the carry) and the candidate.
template <typename T>
struct OptionsGradSplitArgs {
  int64_t B, P, steps, t;
  const int64_t* lengths;
  const T* grad_output;     // [B, P] this step
  T* dh_carry;              // [B, P] in: from the later steps; out: h_prev's share
  T* dh_candidate;          // [B, P] the candidate's share (zero on inactive rows)
  const T* zoneout_h_mask;  // [B, P] this step's, or nullptr
  T zoneout_h;
  bool zoneout_h_on;
};

// Thread `index` = b * P + k.
template <typename T>
RNNFAST_HD void options_grad_split_unit(const OptionsGradSplitArgs<T>& a, int64_t index) {
  using A = AccType<T>;
  const int64_t b = index / a.P, k = index - b * a.P;
  if (a.t >= length_of(a.lengths, b, a.steps)) {
    a.dh_candidate[index] = T(A(0));
    return;
  }
  const A d = A(a.grad_output[index]) + A(a.dh_carry[index]);
  A to_prev = A(0), to_candidate = d;
  if (a.zoneout_h_on) {
    const T* mask = a.zoneout_h_mask ? a.zoneout_h_mask + b * a.P : nullptr;
    zoneout_backward(keep_value(mask, a.zoneout_h, k), d, to_prev, to_candidate);
  }
  a.dh_carry[index] = T(to_prev);
  a.dh_candidate[index] = T(to_candidate);
}

template <typename T>
struct OptionsBackwardArgs {
  int64_t B, H, P, G, S;  // S: the cell's saved values per unit
  int64_t steps, t;
  const int64_t* lengths;
  const T* dh_cell;         // [B, H] dLoss/dh of the cell's h (before projection and zoneout)
  AccType<T>* dc_carry;     // [B, H] LSTM: in dLoss/dc of the step's state, out of c_prev
  T* dc_scratch;            // [B, 2H] LSTM: the new c's share and the normalisation's
  const T* saved;           // [B, S * H] this step's cell_saved, or nullptr (S == 0)
  const T* h_prev;          // [B, P] this step's
  const T* c_prev;          // [B, H] this step's (LSTM)
  const T* h_cell;          // [B, H] this step's cell h (Elman's saved value)
  const T* zoneout_c_mask;  // [B, H] this step's, or nullptr
  T zoneout_c;
  bool zoneout_c_on;
  const T* gain_c;     // [H] norm_cell_weight, or nullptr
  const T* norm_cell;  // [B, H] this step's normal forms of c (with gain_c)
  const T* gain_hh;    // [G] norm_hh_weight, or nullptr
  const T* norm_hh;    // [B, G] this step's (with gain_hh)
  const T* rstd;       // [B, 3] this step's (with a normalisation)
  T* dc_out;           // [B, H] this step's dLoss/dc_out (with gain_c), for its gains
  T* dxg;              // [B, G] this step's
  T* dhg;              // [B, G] after hg's normalisation (== dxg unless GRU)
  T* dhg_raw;          // [B, G] before it (== dhg without gain_hh)
  T* dh_direct;        // [B, H] GRU: dLoss/dh_prev through z; else nullptr
};

// Block b: row b of one reverse step, for active rows.
template <typename Cell, typename T>
RNNFAST_HD void options_backward_row(const OptionsBackwardArgs<T>& a, int64_t b,
                                     AccType<T>* partials) {
  using A = AccType<T>;
  const int64_t H = a.H, P = a.P, G = a.G;
  const int64_t first = BlockThreads::first(), stride = BlockThreads::stride();
  if (a.t >= length_of(a.lengths, b, a.steps)) return;  // its gradients stay zero
  const int cell_H = static_cast<int>(H);
  const T* saved = a.saved != nullptr ? a.saved + b * a.S * H : nullptr;
  const T* dh = a.dh_cell + b * H;
  T* dxg = a.dxg + b * G;
  T* dhg = a.dhg + b * G;
  if constexpr (Cell::kHasCellState) {
    A* dc = a.dc_carry + b * H;
    T* dc_new = a.dc_scratch + b * 2 * H;
    const T* cp = a.c_prev + b * H;
    const T* mask = a.zoneout_c_mask ? a.zoneout_c_mask + b * H : nullptr;
    // dc: dLoss/dc of the step's state, split by zoneout into what reaches c_prev directly
    // (kept in dc) and the new cell state's share (dc_new).
    for (int64_t j = first; j < H; j += stride) {
      const A d = dc[j];
      A to_prev = A(0), to_new = d;
      if (a.zoneout_c_on) zoneout_backward(keep_value(mask, a.zoneout_c, j), d, to_prev, to_new);
      dc[j] = to_prev;
      dc_new[j] = T(to_new);
    }
    if (a.gain_c != nullptr) {
      // dLoss/dc_out through h, then through the normalisation into dc.
      T* dc_out = a.dc_out + b * H;
      for (int64_t j = first; j < H; j += stride) {
        dc_out[j] = T(Cell::output_backward(cell_H, static_cast<int>(j), saved, A(dh[j]), dxg));
      }
      T* dc_through_norm = dc_new + H;
      block_layer_norm_backward<A>(H, dc_out, a.norm_cell + b * H, A(a.rstd[b * 3 + 2]), a.gain_c,
                                   dc_through_norm, partials);
      for (int64_t j = first; j < H; j += stride) {
        A dc_prev = A(0);
        Cell::state_backward(cell_H, static_cast<int>(j), saved, A(cp[j]),
                             A(dc_new[j]) + A(dc_through_norm[j]), dxg, dc_prev);
        dc[j] = dc[j] + dc_prev;
      }
    } else {
      for (int64_t j = first; j < H; j += stride) {
        A dc_prev = A(0), unused = A(0);
        Cell::backward(cell_H, static_cast<int>(j), saved, A(0), A(cp[j]), A(dh[j]), A(dc_new[j]),
                       dxg, dhg, dc_prev, unused);
        dc[j] = dc[j] + dc_prev;
      }
    }
  } else {
    const T* hp = a.h_prev + b * P;
    // Elman reads act' from its output, the cell's h (before zoneout).
    const T* cell_saved = a.S > 0 ? saved : a.h_cell + b * H;
    for (int64_t j = first; j < H; j += stride) {
      A unused = A(0), direct = A(0);
      Cell::backward(cell_H, static_cast<int>(j), cell_saved, A(hp[j]), A(0), A(dh[j]), A(0), dxg,
                     dhg, unused, direct);
      if (Cell::kReadsPrevHidden) a.dh_direct[b * H + j] = T(direct);
    }
  }
  if (a.gain_hh != nullptr) {
    block_layer_norm_backward<A>(G, dhg, a.norm_hh + b * G, A(a.rstd[b * 3 + 1]), a.gain_hh,
                                 a.dhg_raw + b * G, partials);
  }
}

// The carry into the previous step: the recurrent product's share through the dropout mask,
// and GRU's z * h_prev.
template <typename T>
struct OptionsCarryArgs {
  int64_t B, P, steps, t;
  const int64_t* lengths;
  const T* dh_in;           // [B, P] dhg_raw W_hh: of the product's input h_prev * mask
  const T* recurrent_mask;  // [B, P] or nullptr
  const T* dh_direct;       // [B, P] GRU's, else nullptr
  T* dh_carry;              // [B, P]
};

// Thread `index` = b * P + k.
template <typename T>
RNNFAST_HD void options_carry_unit(const OptionsCarryArgs<T>& a, int64_t index) {
  using A = AccType<T>;
  const int64_t b = index / a.P;
  if (a.t >= length_of(a.lengths, b, a.steps)) return;
  A d = A(a.dh_in[index]);
  if (a.recurrent_mask != nullptr) d = d * A(a.recurrent_mask[index]);
  if (a.dh_direct != nullptr) d = d + A(a.dh_direct[index]);
  a.dh_carry[index] = T(A(a.dh_carry[index]) + d);
}

// The input side's normalisation after the loop, all T * B rows at once: dxg = the gradient of
// xg's layer normalisation, in place.
template <typename T>
struct OptionsNormBackwardArgs {
  int64_t G;
  T* dxg;               // [T * B, G] in: after the normalisation; out: before it
  const T* normalized;  // [T * B, G] norm_ih
  const T* rstd;        // [T * B, 3], column 0
  const T* gain;        // [G]
};

// Block `row`: one row of the T * B.
template <typename T>
RNNFAST_HD void options_norm_backward_row(const OptionsNormBackwardArgs<T>& a, int64_t row,
                                          AccType<T>* partials) {
  using A = AccType<T>;
  T* d = a.dxg + row * a.G;
  block_layer_norm_backward<A>(a.G, d, a.normalized + row * a.G, A(a.rstd[row * 3]), a.gain, d,
                               partials);
}

// A row kernel: block `row` of [0, blocks) runs Row(args, row, partials) with kRowThreads
// threads and [kRowThreads] partial sums in shared memory.
template <typename Args, typename A, void (*Row)(const Args&, int64_t, A*)>
struct RowKernel {
  static constexpr int kMaxThreadsPerBlock = kRowThreads;
#if defined(__CUDACC__)
  static __device__ void run_on_device(const Args& args) {
    __shared__ A partials[kRowThreads];
    Row(args, blockIdx.x, partials);
  }
#endif
  static void run_on_host(const LaunchShape& shape, const Args& args) {
    A partials[kRowThreads];
    for (int64_t row = 0; row < shape.blocks; ++row) Row(args, row, partials);
  }
};

inline LaunchShape row_shape(int64_t rows) { return {rows, kRowThreads, 0}; }

}  // namespace cuda
}  // namespace rnnfast
