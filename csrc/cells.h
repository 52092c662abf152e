// The cell equations: the one place the pointwise math of every rnnfast cell is written.
//
// Both engines (csrc/cpu and csrc/cuda) drive these functions; they include no torch header
// so that nvcc can compile them on their own.
//
// Conventions (torch.nn's, so weights move between rnnfast and torch.nn unchanged):
//   G = gates * H pre-activations per batch row, gate k of hidden unit j at index k * H + j.
//   xg = x W_ih^T + b_ih           [G]   (input projection of this step)
//   hg = h_prev W_hh^T + b_hh      [G]   (recurrent projection of this step)
//   LSTM gates i, f, g, o:  c = f * c_prev + i * act(g);  h = o * act(c)
//   GRU gates r, z, n:      n = tanh(xg_n + r * hg_n);   h = (1 - z) * n + z * h_prev
//   Elman:                  h = act(xg + hg)
// Every function handles hidden unit j of one batch row (or, on the CPU, a run of units j as
// one SIMD vector); `T` is the storage type of the gate and workspace buffers, `A` the
// accumulation type (float for float / half / bfloat16 storage, double for double).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RNNFAST_HD __host__ __device__ __forceinline__
#define RNNFAST_HD_INLINED __host__ __device__ __forceinline__
#else
#define RNNFAST_HD inline
// Always inlined on the CPU: a template of scalar types only (the layer normalisation's
// formulas) has one name in every instruction set's copy of the CPU engine, so its
// out-of-line copies are one function, the first the linker meets: the portable copy's, without
// AVX (csrc/cpu/capability.h).
#define RNNFAST_HD_INLINED inline __attribute__((always_inline))
#endif

namespace rnnfast {

enum class Activation { Tanh, Relu, Sigmoid };

// The cells the engines know, in the order of the op's `cell` names (see cell_from_name).
enum class CellKind { LstmTanh, LstmRelu, LstmSigmoid, Gru, ElmanTanh, ElmanRelu, ElmanSigmoid };

// The few functions the cells need beyond + - * /, per value type A. Specialised here for the
// scalars; the CPU engine adds SIMD vector types (csrc/cpu/vector_math.h), so the same cell code
// computes one unit or a vector of units.
template <typename A>
struct Math;

// relu and its gradient as torch's: relu(NaN) is NaN; the gradient is zero where y <= 0 (also a
// NaN or Inf one) and passes unchanged elsewhere, a NaN y included (threshold_backward).
template <>
struct Math<float> {
  RNNFAST_HD static float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }
  RNNFAST_HD static float tanh(float x) { return ::tanhf(x); }
  RNNFAST_HD static float relu(float x) { return x < 0.0f ? 0.0f : x; }
  RNNFAST_HD static float relu_grad(float grad, float y) { return y <= 0.0f ? 0.0f : grad; }
  RNNFAST_HD static float sqrt(float x) { return ::sqrtf(x); }
};

template <>
struct Math<double> {
  RNNFAST_HD static double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  RNNFAST_HD static double tanh(double x) { return ::tanh(x); }
  RNNFAST_HD static double relu(double x) { return x < 0.0 ? 0.0 : x; }
  RNNFAST_HD static double relu_grad(double grad, double y) { return y <= 0.0 ? 0.0 : grad; }
  RNNFAST_HD static double sqrt(double x) { return ::sqrt(x); }
};

// Unit j of the gate block starting at `offset` of a row, as the accumulation type A. The CPU
// engine overloads load / store for its vector index type (a run of units).
template <typename A, typename T>
RNNFAST_HD A load(const T* row, int offset, int j) {
  return A(row[offset + j]);
}

template <typename T, typename A>
RNNFAST_HD void store(T* row, int offset, int j, A value) {
  row[offset + j] = T(value);
}

// sigmoid and activate are always inlined, as the vector math under them (csrc/cpu/vector_math.h
// says why).
template <typename A>
RNNFAST_HD_INLINED A sigmoid(A x) {
  return Math<A>::sigmoid(x);
}

template <Activation Act, typename A>
RNNFAST_HD_INLINED A activate(A x) {
  if constexpr (Act == Activation::Tanh) {
    return Math<A>::tanh(x);
  } else if constexpr (Act == Activation::Relu) {
    return Math<A>::relu(x);
  } else {
    return sigmoid(x);
  }
}

// grad * d act(x) / dx, written in terms of y = act(x), so the backward needs only saved outputs.
template <Activation Act, typename A>
RNNFAST_HD A activation_grad_times(A grad, A y) {
  if constexpr (Act == Activation::Tanh) {
    return grad * (A(1) - y * y);
  } else if constexpr (Act == Activation::Relu) {
    return Math<A>::relu_grad(grad, y);
  } else {
    return grad * (y * (A(1) - y));
  }
}

// ---------------------------------------------------------------------------------------------
// Each cell is a struct with:
//   kGates            gates per hidden unit (G = kGates * H)
//   kHasCellState     LSTM's c
//   kSeparateHiddenGateGrad  true when d(hg) differs from d(xg) (GRU's n gate), so the engine
//                     keeps two gate-gradient buffers
//   kHiddenBiasFoldable  true when b_hh may be added to xg once for all steps (h's
//                     projection enters only as the sum xg + hg)
//   kSavedPerUnit     values saved per hidden unit in the workspace for the backward
//   kReadsPrevHidden  whether backward needs h_prev (GRU's z gate mixes it in directly)
//   forward(...)      one unit's step; writes h, c and the saved values
//   backward(...)     one unit's reverse step
// Pointers are to the current batch row; `saved` is that row's [kSavedPerUnit * H] block.
// ---------------------------------------------------------------------------------------------

// LSTM, with Keras' `activation` on the candidate and on the cell state.
// saved: [i, f, g, o, c] x H  (activated gates and the new cell state).
template <Activation Act>
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr bool kHasCellState = true;
  static constexpr bool kSeparateHiddenGateGrad = false;
  static constexpr bool kHiddenBiasFoldable = true;
  static constexpr int kSavedPerUnit = 5;
  static constexpr bool kReadsPrevHidden = false;

  // The gates and the new cell state c = f * c_prev + i * g, returned; o_j gets the output
  // gate. saved: [i, f, g, o] into its first 4H (or nullptr).
  template <typename A, typename T, typename Index>
  RNNFAST_HD_INLINED static A cell_state(int H, Index j, const T* xg, const T* hg, A c_prev_j,
                                         A& o_j, T* saved) {
    const A i = sigmoid(load<A>(xg, 0, j) + load<A>(hg, 0, j));
    const A f = sigmoid(load<A>(xg, H, j) + load<A>(hg, H, j));
    const A g = activate<Act>(load<A>(xg, 2 * H, j) + load<A>(hg, 2 * H, j));
    o_j = sigmoid(load<A>(xg, 3 * H, j) + load<A>(hg, 3 * H, j));
    if (saved != nullptr) {
      store(saved, 0, j, i);
      store(saved, H, j, f);
      store(saved, 2 * H, j, g);
      store(saved, 3 * H, j, o_j);
    }
    return f * c_prev_j + i * g;
  }

  // h = o * act(c_out), where c_out is the cell state (or, layer-normalised, its normal form).
  template <typename A>
  RNNFAST_HD static A hidden(A o_j, A c_out_j) {
    return o_j * activate<Act>(c_out_j);
  }

  // xg, hg: [4H]; saved: [5H] or nullptr (inference). Index: int (one unit) or a vector index.
  template <typename A, typename T, typename Index>
  RNNFAST_HD static void forward(int H, Index j, const T* xg, const T* hg, A /*h_prev_j*/,
                                 A c_prev_j, A& h_new_j, A& c_new_j, T* saved) {
    A o;
    const A c = cell_state(H, j, xg, hg, c_prev_j, o, saved);
    c_new_j = c;
    h_new_j = hidden(o, c);
    if (saved != nullptr) store(saved, 4 * H, j, c);
  }

  // The output side of the backward, h = o * act(c_out) with c_out = saved[4H]: writes the
  // output gate's d(pre-activation) into dxg[3H] and returns dLoss/dc_out of this path.
  template <typename A, typename T, typename Index>
  RNNFAST_HD static A output_backward(int H, Index j, const T* saved, A dh_j, T* dxg) {
    const A o = load<A>(saved, 3 * H, j);
    const A act_c = activate<Act>(load<A>(saved, 4 * H, j));
    store(dxg, 3 * H, j, dh_j * act_c * o * (A(1) - o));
    return activation_grad_times<Act>(dh_j * o, act_c);
  }

  // The state side, c = f * c_prev + i * g, from dc (dLoss/dc, all paths): writes the
  // d(pre-activation) of gates i, f, g into dxg and dLoss/dc_prev into dc_prev_j.
  template <typename A, typename T, typename Index>
  RNNFAST_HD static void state_backward(int H, Index j, const T* saved, A c_prev_j, A dc, T* dxg,
                                        A& dc_prev_j) {
    const A i = load<A>(saved, 0, j);
    const A f = load<A>(saved, H, j);
    const A g = load<A>(saved, 2 * H, j);
    store(dxg, 0, j, dc * g * i * (A(1) - i));
    store(dxg, H, j, dc * c_prev_j * f * (A(1) - f));
    store(dxg, 2 * H, j, activation_grad_times<Act>(dc * i, g));
    dc_prev_j = dc * f;
  }

  // dh_j: dLoss/dh_new (all paths); dc_j: dLoss/dc_new from the next step.
  // Writes d(pre-activation) of the 4 gates into dxg [4H] and dLoss/dc_prev into dc_prev_j.
  // dh_prev_direct_j: LSTM's h_prev reaches the step only through hg, so it is 0.
  template <typename A, typename T, typename Index>
  RNNFAST_HD static void backward(int H, Index j, const T* saved, A /*h_prev_j*/, A c_prev_j,
                                  A dh_j, A dc_j, T* dxg, T* /*dhg*/, A& dc_prev_j,
                                  A& dh_prev_direct_j) {
    const A dc = dc_j + output_backward(H, j, saved, dh_j, dxg);
    state_backward(H, j, saved, c_prev_j, dc, dxg, dc_prev_j);
    dh_prev_direct_j = A(0);
  }
};

// GRU as torch.nn has it (r applied after the hidden projection of the n gate).
// saved: [r, z, n, hg_n] x H.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr bool kHasCellState = false;
  static constexpr bool kSeparateHiddenGateGrad = true;
  static constexpr bool kHiddenBiasFoldable = false;
  static constexpr int kSavedPerUnit = 4;
  static constexpr bool kReadsPrevHidden = true;

  template <typename A, typename T, typename Index>
  RNNFAST_HD static void forward(int H, Index j, const T* xg, const T* hg, A h_prev_j,
                                 A /*c_prev_j*/, A& h_new_j, A& /*c_new_j*/, T* saved) {
    const A r = sigmoid(load<A>(xg, 0, j) + load<A>(hg, 0, j));
    const A z = sigmoid(load<A>(xg, H, j) + load<A>(hg, H, j));
    const A hn = load<A>(hg, 2 * H, j);
    const A n = Math<A>::tanh(load<A>(xg, 2 * H, j) + r * hn);
    h_new_j = n + z * (h_prev_j - n);
    if (saved != nullptr) {
      store(saved, 0, j, r);
      store(saved, H, j, z);
      store(saved, 2 * H, j, n);
      store(saved, 3 * H, j, hn);
    }
  }

  // dxg, dhg: [3H] gradients of xg and hg; they differ only in the n gate (dhg_n = dxg_n * r).
  template <typename A, typename T, typename Index>
  RNNFAST_HD static void backward(int H, Index j, const T* saved, A h_prev_j, A /*c_prev_j*/,
                                  A dh_j, A /*dc_j*/, T* dxg, T* dhg, A& /*dc_prev_j*/,
                                  A& dh_prev_direct_j) {
    const A r = load<A>(saved, 0, j);
    const A z = load<A>(saved, H, j);
    const A n = load<A>(saved, 2 * H, j);
    const A hn = load<A>(saved, 3 * H, j);
    const A dn_pre = dh_j * (A(1) - z) * (A(1) - n * n);
    const A dr_pre = dn_pre * hn * r * (A(1) - r);
    const A dz_pre = dh_j * (h_prev_j - n) * z * (A(1) - z);
    store(dxg, 0, j, dr_pre);
    store(dxg, H, j, dz_pre);
    store(dxg, 2 * H, j, dn_pre);
    store(dhg, 0, j, dr_pre);
    store(dhg, H, j, dz_pre);
    store(dhg, 2 * H, j, dn_pre * r);
    dh_prev_direct_j = dh_j * z;
  }
};

// Elman: h = act(xg + hg). Nothing to save: the backward reads act' from the output h.
template <Activation Act>
struct ElmanCell {
  static constexpr int kGates = 1;
  static constexpr bool kHasCellState = false;
  static constexpr bool kSeparateHiddenGateGrad = false;
  static constexpr bool kHiddenBiasFoldable = true;
  static constexpr int kSavedPerUnit = 0;
  static constexpr bool kReadsPrevHidden = false;

  template <typename A, typename T, typename Index>
  RNNFAST_HD static void forward(int /*H*/, Index j, const T* xg, const T* hg, A /*h_prev_j*/,
                                 A /*c_prev_j*/, A& h_new_j, A& /*c_new_j*/, T* /*saved*/) {
    h_new_j = activate<Act>(load<A>(xg, 0, j) + load<A>(hg, 0, j));
  }

  // Elman's saved value is its output: the engine passes the output row h_new as `saved`.
  template <typename A, typename T, typename Index>
  RNNFAST_HD static void backward(int /*H*/, Index j, const T* h_new, A /*h_prev_j*/,
                                  A /*c_prev_j*/, A dh_j, A /*dc_j*/, T* dxg, T* /*dhg*/,
                                  A& /*dc_prev_j*/, A& dh_prev_direct_j) {
    store(dxg, 0, j, activation_grad_times<Act>(dh_j, load<A>(h_new, 0, j)));
    dh_prev_direct_j = A(0);
  }
};

// ---------------------------------------------------------------------------------------------
// Cell options beyond torch.nn (the layers' layer_norm, zoneout and recurrent dropout). The
// engines apply them around the cells above:
//   recurrent dropout (Gal and Ghahramani 2016, as Keras' recurrent_dropout): the product's
//     input is h_prev * mask, one mask [B, P] of 0 and 1 / (1 - p) per sequence;
//   layer normalisation (Ba, Kiros and Hinton 2016): xg = LN(x W_ih^T) * gain_ih + b_ih and
//     hg = LN(h W_hh^T) * gain_hh + b_hh over each row's G values; the LSTM's h = o *
//     act(LN(c) * gain_c + bias_c), its state c itself unnormalised;
//   zoneout (Krueger et al. 2017): after the cell, h = zoneout(keep_h, h_prev, h_new) and the
//     LSTM's c = zoneout(keep_c, c_prev, c_new), keep a 0 / 1 mask per step and unit in
//     training and the probability p in inference (the expectation).
// ---------------------------------------------------------------------------------------------

// The layer normalisation's epsilon: torch.nn.LayerNorm's default.
constexpr double kLayerNormEpsilon = 1e-5;

// The layer normalisation's per-element formulas, shared by the CPU engine's SIMD rows
// (csrc/cpu/layer_norm_rows.h) and the CUDA engine's block-wide rows
// (csrc/cuda/options_kernels.cuh), which sum in their own order but normalise and differentiate
// each element alike.
//
// 1 / sqrt(var + eps) from the sum of the n centred squares.
template <typename A>
RNNFAST_HD_INLINED A layer_norm_rstd(A sum_of_squares, int n) {
  return A(1) / Math<A>::sqrt(sum_of_squares / A(n) + A(kLayerNormEpsilon));
}

// The normal form x_hat = (x - mean) / sqrt(var + eps) of one element.
template <typename A>
RNNFAST_HD_INLINED A layer_norm_normal_form(A x, A mean, A rstd) {
  return (x - mean) * rstd;
}

// y = x_hat * gain + bias of one element (bias 0 where the row has none).
template <typename A>
RNNFAST_HD_INLINED A layer_norm_affine(A x_hat, A gain, A bias) {
  return x_hat * gain + bias;
}

// dLoss/dx of one element, from g = dy * gain, its x_hat and the row's means of g and
// g * x_hat: rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
template <typename A>
RNNFAST_HD_INLINED A layer_norm_input_grad(A g, A x_hat, A mean_g, A mean_g_x_hat, A rstd) {
  return rstd * (g - mean_g - x_hat * mean_g_x_hat);
}

// Zoneout of one unit: the previous value where keep is 1, the new one where it is 0, and
// their mix for a probability (inference).
template <typename A>
RNNFAST_HD_INLINED A zoneout(A keep, A previous, A candidate) {
  return candidate + keep * (previous - candidate);
}

// Its gradient: d flows to the previous value by keep, to the new one by 1 - keep.
template <typename A>
RNNFAST_HD_INLINED void zoneout_backward(A keep, A d, A& d_previous, A& d_candidate) {
  d_previous = keep * d;
  d_candidate = d - d_previous;
}

// The cells' names: the op's `cell` argument, and rnnfast._C.cells, from which the Python side
// (rnnfast/_ops.py) and the tests take the names and each cell's sizes. The one list of them.
struct CellName {
  CellKind kind;
  const char* name;
};
inline constexpr CellName kCellNames[] = {{CellKind::LstmTanh, "lstm"},
                                          {CellKind::LstmRelu, "lstm_relu"},
                                          {CellKind::LstmSigmoid, "lstm_sigmoid"},
                                          {CellKind::Gru, "gru"},
                                          {CellKind::ElmanTanh, "elman_tanh"},
                                          {CellKind::ElmanRelu, "elman_relu"},
                                          {CellKind::ElmanSigmoid, "elman_sigmoid"}};

// Calls `fn(CellType{})` with the cell struct named by `kind`; the engines use it to turn the
// op's run-time cell name into a compile-time template argument.
template <typename Fn>
decltype(auto) dispatch_cell(CellKind kind, Fn&& fn) {
  switch (kind) {
    case CellKind::LstmTanh: return fn(LstmCell<Activation::Tanh>{});
    case CellKind::LstmRelu: return fn(LstmCell<Activation::Relu>{});
    case CellKind::LstmSigmoid: return fn(LstmCell<Activation::Sigmoid>{});
    case CellKind::Gru: return fn(GruCell{});
    case CellKind::ElmanTanh: return fn(ElmanCell<Activation::Tanh>{});
    case CellKind::ElmanRelu: return fn(ElmanCell<Activation::Relu>{});
    case CellKind::ElmanSigmoid:
    default: return fn(ElmanCell<Activation::Sigmoid>{});
  }
}

}  // namespace rnnfast
