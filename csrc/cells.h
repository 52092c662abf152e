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
// Every function handles one hidden unit j of one batch row; `T` is the storage type of the
// gate and workspace buffers, `A` the accumulation type (float for float / half / bfloat16
// storage, double for double).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RNNFAST_HD __host__ __device__ __forceinline__
#else
#define RNNFAST_HD inline
#endif

namespace rnnfast {

enum class Activation { Tanh, Relu, Sigmoid };

// The cells the engines know, in the order of the op's `cell` names (see cell_from_name).
enum class CellKind { LstmTanh, LstmRelu, LstmSigmoid, Gru, RnnTanh, RnnRelu, RnnSigmoid };

// exp and tanh by name for each accumulation type, the same spelling on host and device.
RNNFAST_HD float exp_of(float x) { return ::expf(x); }
RNNFAST_HD double exp_of(double x) { return ::exp(x); }
RNNFAST_HD float tanh_of(float x) { return ::tanhf(x); }
RNNFAST_HD double tanh_of(double x) { return ::tanh(x); }

template <typename A>
RNNFAST_HD A sigmoid(A x) {
  return A(1) / (A(1) + exp_of(-x));
}

template <Activation Act, typename A>
RNNFAST_HD A activate(A x) {
  if constexpr (Act == Activation::Tanh) {
    return tanh_of(x);
  } else if constexpr (Act == Activation::Relu) {
    return x > A(0) ? x : A(0);
  } else {
    return sigmoid(x);
  }
}

// d act(x) / dx written in terms of y = act(x), so the backward needs only saved outputs.
template <Activation Act, typename A>
RNNFAST_HD A activation_grad_from_output(A y) {
  if constexpr (Act == Activation::Tanh) {
    return A(1) - y * y;
  } else if constexpr (Act == Activation::Relu) {
    return y > A(0) ? A(1) : A(0);
  } else {
    return y * (A(1) - y);
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

  // xg, hg: [4H]; c_prev, c_new, h_new: [H]; saved: [5H] or nullptr (inference).
  template <typename A, typename T>
  RNNFAST_HD static void forward(int H, int j, const T* xg, const T* hg, A /*h_prev_j*/,
                                 A c_prev_j, A& h_new_j, A& c_new_j, T* saved) {
    const A i = sigmoid(A(xg[j]) + A(hg[j]));
    const A f = sigmoid(A(xg[H + j]) + A(hg[H + j]));
    const A g = activate<Act>(A(xg[2 * H + j]) + A(hg[2 * H + j]));
    const A o = sigmoid(A(xg[3 * H + j]) + A(hg[3 * H + j]));
    const A c = f * c_prev_j + i * g;
    c_new_j = c;
    h_new_j = o * activate<Act>(c);
    if (saved != nullptr) {
      saved[j] = T(i);
      saved[H + j] = T(f);
      saved[2 * H + j] = T(g);
      saved[3 * H + j] = T(o);
      saved[4 * H + j] = T(c);
    }
  }

  // dh_j: dLoss/dh_new (all paths); dc_j: dLoss/dc_new from the next step.
  // Writes d(pre-activation) of the 4 gates into dxg [4H] and dLoss/dc_prev into dc_prev_j.
  // dh_prev_direct_j: LSTM's h_prev reaches the step only through hg, so it is 0.
  template <typename A, typename T>
  RNNFAST_HD static void backward(int H, int j, const T* saved, A /*h_prev_j*/, A c_prev_j,
                                  A dh_j, A dc_j, T* dxg, T* /*dhg*/, A& dc_prev_j,
                                  A& dh_prev_direct_j) {
    const A i = A(saved[j]);
    const A f = A(saved[H + j]);
    const A g = A(saved[2 * H + j]);
    const A o = A(saved[3 * H + j]);
    const A act_c = activate<Act>(A(saved[4 * H + j]));
    const A dc = dc_j + dh_j * o * activation_grad_from_output<Act>(act_c);
    dxg[j] = T(dc * g * i * (A(1) - i));
    dxg[H + j] = T(dc * c_prev_j * f * (A(1) - f));
    dxg[2 * H + j] = T(dc * i * activation_grad_from_output<Act>(g));
    dxg[3 * H + j] = T(dh_j * act_c * o * (A(1) - o));
    dc_prev_j = dc * f;
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

  template <typename A, typename T>
  RNNFAST_HD static void forward(int H, int j, const T* xg, const T* hg, A h_prev_j,
                                 A /*c_prev_j*/, A& h_new_j, A& /*c_new_j*/, T* saved) {
    const A r = sigmoid(A(xg[j]) + A(hg[j]));
    const A z = sigmoid(A(xg[H + j]) + A(hg[H + j]));
    const A hn = A(hg[2 * H + j]);
    const A n = tanh_of(A(xg[2 * H + j]) + r * hn);
    h_new_j = n + z * (h_prev_j - n);
    if (saved != nullptr) {
      saved[j] = T(r);
      saved[H + j] = T(z);
      saved[2 * H + j] = T(n);
      saved[3 * H + j] = T(hn);
    }
  }

  // dxg, dhg: [3H] gradients of xg and hg; they differ only in the n gate (dhg_n = dxg_n * r).
  template <typename A, typename T>
  RNNFAST_HD static void backward(int H, int j, const T* saved, A h_prev_j, A /*c_prev_j*/,
                                  A dh_j, A /*dc_j*/, T* dxg, T* dhg, A& /*dc_prev_j*/,
                                  A& dh_prev_direct_j) {
    const A r = A(saved[j]);
    const A z = A(saved[H + j]);
    const A n = A(saved[2 * H + j]);
    const A hn = A(saved[3 * H + j]);
    const A dn_pre = dh_j * (A(1) - z) * (A(1) - n * n);
    const A dr_pre = dn_pre * hn * r * (A(1) - r);
    const A dz_pre = dh_j * (h_prev_j - n) * z * (A(1) - z);
    dxg[j] = T(dr_pre);
    dxg[H + j] = T(dz_pre);
    dxg[2 * H + j] = T(dn_pre);
    dhg[j] = T(dr_pre);
    dhg[H + j] = T(dz_pre);
    dhg[2 * H + j] = T(dn_pre * r);
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

  template <typename A, typename T>
  RNNFAST_HD static void forward(int /*H*/, int j, const T* xg, const T* hg, A /*h_prev_j*/,
                                 A /*c_prev_j*/, A& h_new_j, A& /*c_new_j*/, T* /*saved*/) {
    h_new_j = activate<Act>(A(xg[j]) + A(hg[j]));
  }

  // Elman's saved value is its output: the engine passes h_new through `saved`.
  template <typename A, typename T>
  RNNFAST_HD static void backward(int /*H*/, int j, const T* h_new, A /*h_prev_j*/,
                                  A /*c_prev_j*/, A dh_j, A /*dc_j*/, T* dxg, T* /*dhg*/,
                                  A& /*dc_prev_j*/, A& dh_prev_direct_j) {
    dxg[j] = T(dh_j * activation_grad_from_output<Act>(A(h_new[j])));
    dh_prev_direct_j = A(0);
  }
};

// Calls `fn(CellType{})` with the cell struct named by `kind`; the engines use it to turn the
// op's run-time cell name into a compile-time template argument.
template <typename Fn>
decltype(auto) dispatch_cell(CellKind kind, Fn&& fn) {
  switch (kind) {
    case CellKind::LstmTanh: return fn(LstmCell<Activation::Tanh>{});
    case CellKind::LstmRelu: return fn(LstmCell<Activation::Relu>{});
    case CellKind::LstmSigmoid: return fn(LstmCell<Activation::Sigmoid>{});
    case CellKind::Gru: return fn(GruCell{});
    case CellKind::RnnTanh: return fn(ElmanCell<Activation::Tanh>{});
    case CellKind::RnnRelu: return fn(ElmanCell<Activation::Relu>{});
    case CellKind::RnnSigmoid: default: return fn(ElmanCell<Activation::Sigmoid>{});
  }
}

}  // namespace rnnfast
