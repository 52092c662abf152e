// What every engine needs to know about one call of a layer op: the cell, the sizes, and the
// checked arguments. Shared by the CPU and CUDA engines (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <string>

#include "cells.h"

namespace rnnfast {

CellKind cell_from_name(const std::string& name);

// Whether the cell keeps a cell state c beside h (LSTM).
inline bool has_cell_state(CellKind kind) {
  return dispatch_cell(kind, [](auto cell) { return decltype(cell)::kHasCellState; });
}

// Values saved per time step and batch row for the backward (the workspace's last dim).
int64_t workspace_width(CellKind kind, int64_t hidden_size, bool has_projection);

struct LayerSizes {
  CellKind kind;
  int64_t steps;        // T
  int64_t batch;        // B
  int64_t input_size;   // I
  int64_t hidden_size;  // H
  int64_t state_size;   // P: size of h (proj_size when projecting, else H)
  int64_t gate_size;    // G = gates * H
  bool has_projection;
  bool has_lengths;
  bool has_initial_state;  // hx (and cx) given; without them the states start at zero
};

// One call of a layer op as its schema gives it (rnnfast::forward's arguments but
// save_workspace; differentiable_forward's), made once where an op's kernel receives them and
// passed on to the checks, the engines and autograd. A tensor the caller left out (None) is
// undefined here.
struct LayerArgs {
  std::string cell;
  at::Tensor input;       // [T, B, I]; [B, T, I] where batch_first
  at::Tensor hx, cx;      // [B, P], [B, H] (LSTM only); undefined: zero initial states
  at::Tensor w_ih, w_hh;  // [G, I], [G, P]
  at::Tensor b_ih, b_hh;  // [G] each, or undefined (a layer without biases)
  at::Tensor w_hr;        // [P, H]: the LSTM's projection, or undefined
  at::Tensor lengths;     // [B] int64: the steps of each batch row, or undefined (all T)
  bool reverse = false;
  bool batch_first = false;

  static LayerArgs of(c10::string_view cell, const at::Tensor& input,
                      const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& w_hr,
                      const std::optional<at::Tensor>& lengths, bool reverse, bool batch_first);
  // The same call on time-major tensors (views): input [T, B, I], batch_first false. From a
  // temporary, its tensors are moved rather than copied.
  LayerArgs time_major() const&;
  LayerArgs time_major() &&;
};

// One call of rnnfast::backward as its schema gives it.
struct BackwardArgs {
  LayerArgs layer;         // the forward's arguments; the biases undefined (has_bias says)
  at::Tensor grad_output;  // [T, B, P]; [B, T, P] where batch_first
  at::Tensor grad_h_n;     // [B, P], or undefined: zero
  at::Tensor grad_c_n;     // [B, H] (LSTM only), or undefined: zero
  at::Tensor output;       // the forward's output, [T, B, P]; [B, T, P] where batch_first
  at::Tensor workspace;    // the forward's workspace, [T, B, W]
  bool has_bias = false;
  bool input_grad = true;  // whether the input's gradient is wanted
  // Whether the gradients of hx and cx are wanted: without, an engine may skip the product that
  // carries dLoss/dh back through the first step and return them empty.
  bool state_grad = true;

  static BackwardArgs of(c10::string_view cell, const at::Tensor& grad_output,
                         const std::optional<at::Tensor>& grad_h_n,
                         const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                         const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                         const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_bias,
                         const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& lengths, bool reverse,
                         const at::Tensor& output, const at::Tensor& workspace, bool input_grad,
                         bool batch_first, bool state_grad = true);
  // The same call on time-major tensors (views), batch_first false.
  BackwardArgs time_major() const&;
  BackwardArgs time_major() &&;
};

// A tensor argument as the dispatcher takes it: None where it is undefined.
inline std::optional<at::Tensor> optional_argument(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Checks a time-major call's arguments (ranks, sizes, dtypes, devices, lengths) and returns the
// sizes; every error names the argument, what was expected and what came.
//   input [T, B, I], hx [B, P], cx [B, H] (LSTM only), w_ih [G, I], w_hh [G, P],
//   b_ih [G], b_hh [G], w_hr [P, H] (LSTM with projection only), lengths [B] int64.
//   hx and cx are both given or both None (zero initial states).
LayerSizes check_layer_args(const LayerArgs& args);

// rnnfast::forward called through the dispatcher, from the dispatch keys the calling thread is
// at (the autograd kernel calls it below autograd; _C.layer from Python above it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(const LayerArgs& args,
                                                                        bool save_workspace);

// Where `output` is the output of an eager differentiable rnnfast::forward call, which its
// graph node saved for the backward: the node saves `replacement` instead, a tensor of the same
// shape and values (a bidirectional layer's output is a view of the directions' concatenation,
// which the next layer saves anyway), and the output's own memory goes once the caller drops
// it. Returns whether it did (false: not such an output; nothing changes).
bool share_saved_output(const at::Tensor& output, const at::Tensor& replacement);

// The graph node of an eager forward call hands its workspace over to the backward op it calls
// where nothing else holds the workspace and the graph is released after it (retain_graph=False):
// during that call, on the calling thread, an engine may write over the workspace (the CPU
// engine's gate gradients take its place).
class WorkspaceHandover {
 public:
  explicit WorkspaceHandover(const at::Tensor& workspace);
  ~WorkspaceHandover();
  WorkspaceHandover(const WorkspaceHandover&) = delete;
  WorkspaceHandover& operator=(const WorkspaceHandover&) = delete;
  // Whether `workspace` (or a view of it) is the one handed over to this thread's call.
  static bool covers(const at::Tensor& workspace);

 private:
  const void* previous_;  // the storage handed over before this one, restored after
};

// Checks a time-major backward call's own arguments against the sizes of the forward.
void check_backward_args(const LayerSizes& sizes, const BackwardArgs& args);

}  // namespace rnnfast

namespace rnnfast {

// A tensor argument made contiguous, or undefined where it is absent.
at::Tensor contiguous_or_undefined(const at::Tensor& t);

// input [T, B, I] made contiguous. A CPU input that is a batch_first tensor transposed (what a
// batch_first call of the ops reads) is copied row by row: ATen's strided copy is several
// times slower where I is small.
at::Tensor time_major_contiguous(const at::Tensor& input);

// A 3-D tensor's batch_first form [B, T, ...] from its time-major one [T, B, ...] or back (a
// view); anything else (a malformed argument the checks refuse, an empty placeholder) as it is.
inline at::Tensor swap_time_and_batch(const at::Tensor& x, bool batch_first) {
  return batch_first && x.defined() && x.dim() == 3 ? x.transpose(0, 1) : x;
}

// Whether an engine reads a layer's input [T, B, I] at the strides it comes with (no
// time-major copy), given the checked sizes; nullptr: never.
using ReadsInputAtStrides = bool (*)(const LayerSizes& sizes, const at::Tensor& input);

// The input as the engine of its device reads it: as it comes where the CPU engine reads it at
// its strides (cpu/input_layout.h), else time_major_contiguous. Taken before the arguments are
// checked (the autograd kernel saves it for both passes): a malformed call gets the copy, and
// the op's checks then refuse it.
at::Tensor engine_input(const at::Tensor& input, const at::Tensor& w_hh, bool has_lengths,
                        bool has_projection);

// rnnfast::differentiable_forward (csrc/differentiable_layer.cpp): the forward op's output,
// h_n and c_n as ATen ops, with the same checks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_layer(const LayerArgs& args);

// The forward op's tensor arguments, checked (check_layer_args) and made contiguous, the same
// on every device (the states and biases are copied or read where they are used).
struct ForwardInputs {
  LayerSizes sizes;
  at::Tensor input, w_ih, w_hh, w_hr, lengths;
};

// args: time-major.
ForwardInputs prepare_forward(const LayerArgs& args,
                              ReadsInputAtStrides reads_input_at_strides = nullptr);

// The backward op's tensor arguments, checked (check_layer_args, check_backward_args) and made
// contiguous, the same on every device. hx and cx are undefined where the forward started
// from zero states.
struct BackwardInputs {
  LayerSizes sizes;
  at::Tensor input, hx, cx, w_ih, w_hh, w_hr, lengths, grad_output, output, workspace;
};

// args: time-major. contiguous_grad_output false: grad_output is left as it comes, for an
// engine that makes it readable itself (with_contiguous_rows, or contiguous).
// strided_output_rows: an output [T, B, P] whose rows are contiguous at one stride (rows
// t * B + b at a stride of stride(1); a view of a bidirectional layer's concatenated output,
// see share_saved_output) is left as it comes, for an engine that reads it so.
BackwardInputs prepare_backward(const BackwardArgs& args, bool contiguous_grad_output = true,
                                ReadsInputAtStrides reads_input_at_strides = nullptr,
                                bool strided_output_rows = false);

// The stride of the rows of x [T, B, C] where they are contiguous at one stride (row t * B + b
// at (t * B + b) * stride), else 0.
inline int64_t strided_rows_stride(const at::Tensor& x) {
  if (x.dim() != 3 || (x.size(2) > 1 && x.stride(2) != 1)) return 0;
  // A dimension of size 1 may come with any stride.
  const int64_t stride = x.size(1) > 1 ? x.stride(1) : x.size(0) > 1 ? x.stride(0) : x.size(2);
  const bool one_stride = x.size(0) <= 1 || x.stride(0) == x.size(1) * stride;
  return one_stride && stride >= x.size(2) ? stride : 0;
}

// x [T, B, P] with contiguous rows of P at any strides over t and b (0 where broadcast), for an
// engine that reads it so: it is spared a [T, B, P] copy where x is a view (a batch_first
// gradient is a transposed one, the gradient of output.sum() an expanded scalar).
at::Tensor with_contiguous_rows(const at::Tensor& x);

// The results of a forward pass, allocated before the time loop (the same on every device).
struct ForwardState {
  at::Tensor output;     // [T, B, P]
  at::Tensor h;          // [B, P]  the running hidden state (starts as a copy of hx, or 0)
  at::Tensor c;          // [B, H]  LSTM's cell state in the accumulation type (starts as cx,
                         //         or 0), else empty
  at::Tensor workspace;  // [T, B, W] when saving for the backward (or [N, W]: packed_rows),
                         // else empty
};

// packed_rows: an engine that saves a packed sequence's active rows only (the CPU engine:
// cpu/layer_view.h) gets a workspace [packed_rows, W] where that is fewer rows than T * B
// (else, and for 0, the padded [T, B, W]).
ForwardState make_forward_state(const LayerSizes& sizes, const LayerArgs& args, bool save_workspace,
                                int64_t packed_rows = 0);

// The workspace as the forward op returns it: with lengths always 2-D, [T * B, W] (a view of
// [T, B, W]) or an engine's packed [N, W], as the op's fake gives it ([rows, W], rows known
// once the engine has run); without lengths [T, B, W].
at::Tensor returned_workspace(const LayerSizes& sizes, const at::Tensor& workspace);

// The running state and gate-gradient buffers of a backward pass, the same on every device.
struct BackwardState {
  at::Tensor dh;          // [B, P]  dLoss/dh of the step being processed (starts at grad_h_n
                          //         or 0)
  at::Tensor dc;          // [B, H]  dLoss/dc in the accumulation type (LSTM), else undefined
  at::Tensor dgate_x;     // [T, B, G]  dLoss/dxg per step
  at::Tensor dgate_h;     // [T, B, G]  dLoss/dhg per step (an alias of dgate_x unless the cell
                          //            keeps them apart, as GRU); or [T, B, H], the last gate's
                          //            only (GRU's n), where the other gates' equal dgate_x's
  at::Tensor dprojected;  // [T, B, P]  dLoss/d(projected h) per step (projection only)
  // [parts, G] in double or the accumulation type: dgate_x's column sums (the bias gradient)
  // in parts whose sum is the gradient, where the engine sums them as it goes; else undefined,
  // and finish_backward sums dgate_x's columns itself.
  at::Tensor dgate_x_column_sums;
  bool separate_hidden_gate_grad;
};

// dLoss/dh [B, P] and dLoss/dc [B, H] (LSTM, in the accumulation type; else undefined) of the
// last step: copies of grad_h_n and grad_c_n, or zeros where they are None.
std::pair<at::Tensor, at::Tensor> final_state_gradients(const LayerSizes& sizes,
                                                        const BackwardArgs& args);

// dgate_x_buffer: a [T, B, G] tensor the engine may overwrite, taken as dgate_x instead of a new
// one (or a packed sequence's [N, G], see the CPU engine's backward); undefined: allocate.
// last_hidden_gate_only: a separate dgate_h holds the last gate only ([T, B, H]; the engine
// keeps the step's full dLoss/dhg elsewhere). dgate_h_buffer: likewise for dgate_h.
BackwardState make_backward_state(const LayerSizes& sizes, const BackwardArgs& args,
                                  const at::Tensor& dgate_x_buffer = at::Tensor(),
                                  bool last_hidden_gate_only = false,
                                  const at::Tensor& dgate_h_buffer = at::Tensor());

// The final c of a forward pass in the input's dtype (LSTM), else an empty tensor.
at::Tensor final_cell_state(const LayerSizes& sizes, const ForwardState& state,
                            const at::Tensor& input);

// The matrix products and column sums of finish_backward, as an engine does them.
struct GradientKernels {
  // out[m, n] = a[m, k] b[k, n] (+ out where accumulate); a, b: 2-D views with unit stride in
  // one dimension; out: contiguous.
  void (*matmul)(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);
  // out[n] = the sum over the rows of x[rows, n] (x with contiguous rows, at any row stride).
  void (*column_sum)(at::Tensor& out, const at::Tensor& x);

  // The same into new tensors: a [M, K] b [K, N] (the result from the buffer pool), and the
  // column sums of x [rows, n].
  at::Tensor product(const at::Tensor& a, const at::Tensor& b) const;
  at::Tensor column_sums(const at::Tensor& x) const;
};

// ATen's operations: for any device.
extern const GradientKernels kAtenGradientKernels;

// rnnfast::backward's results: the gradients of input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr.
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

// After the reverse loop: the gradients of the input, the weights and the biases as single
// GEMMs / reductions over all T * B rows (a GEMM per batch row for a batch-major input), in the
// order of rnnfast::backward's results (those of hx and cx empty where the forward started from
// zero states). hx, cx: undefined then.
BackwardResult finish_backward(const LayerSizes& sizes, BackwardState& state,
                               const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                               const at::Tensor& w_ih, const at::Tensor& output,
                               const at::Tensor& workspace, const at::Tensor& lengths, bool reverse,
                               bool has_bias, bool input_grad, const GradientKernels& kernels);

// Of finish_backward's results, shared with an engine's own finish: the columns of dLoss/dhg
// that dgate_x holds (all G, or the first G - Gh where a separate dgate_h keeps the last gate's
// Gh), and b_hh's gradient from b_ih's (those columns' sums are the same) and dgate_h's column
// sums (an empty tensor without biases). dgate_h: [T, B, Gh] or packed [N, Gh], rows at any
// stride.
int64_t shared_hidden_gate_cols(const BackwardState& state, int64_t gate_size);
at::Tensor hidden_bias_gradient(const BackwardState& state, const at::Tensor& grad_b_ih,
                                bool has_bias, const GradientKernels& kernels);

// An engine's backward of a time-major call.
using TimeMajorBackward = BackwardResult (*)(const BackwardArgs& args);

// rnnfast::backward around an engine's time-major backward: a batch_first call's input, output
// and output gradient [B, T, ...] go in as time-major views, and its input gradient comes back
// as a [B, T, I] view.
template <TimeMajorBackward time_major>
BackwardResult backward_op(c10::string_view cell, const at::Tensor& grad_output,
                           const std::optional<at::Tensor>& grad_h_n,
                           const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                           const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                           const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_bias,
                           const std::optional<at::Tensor>& w_hr,
                           const std::optional<at::Tensor>& lengths, bool reverse,
                           const at::Tensor& output, const at::Tensor& workspace, bool input_grad,
                           bool batch_first, bool state_grad) {
  BackwardResult gradients =
      time_major(BackwardArgs::of(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh,
                                  has_bias, w_hr, lengths, reverse, output, workspace, input_grad,
                                  batch_first, state_grad)
                     .time_major());
  std::get<0>(gradients) = swap_time_and_batch(std::get<0>(gradients), batch_first);
  if (!state_grad) {
    // Not wanted: an engine may have skipped the product that makes them.
    std::get<1>(gradients) = at::empty({0}, grad_output.options());
    std::get<2>(gradients) = at::empty({0}, grad_output.options());
  }
  return gradients;
}

}  // namespace rnnfast
