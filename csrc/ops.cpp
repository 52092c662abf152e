// Op schemas of rnnfast and the argument checks every engine shares.
//
// One op pair runs ONE layer in ONE direction over a whole (padded, time-major) sequence:
//   rnnfast::forward   input [T, B, I] -> output [T, B, P], h_n [B, P], c_n [B, H] (LSTM),
//                      workspace [T, B, W] (what the backward needs; empty unless asked for;
//                      [rows, W] with lengths, see returned_workspace);
//                      hx = cx = None starts from zero states (and skips work on them)
//   rnnfast::backward  the gradients of all of forward's tensor inputs (grad_h_n, grad_c_n:
//                      None for zero).
//   rnnfast::differentiable_forward  forward's output, h_n and c_n computed by ATen ops that
//                      autograd differentiates to any order (higher derivatives, forward-mode
//                      AD, torch.func's nested transforms); slower than the fused forward.
// batch_first=True: input, output (and their gradients) are [B, T, ...] instead, as views of
// the time-major tensors the engines work on (the workspace is as without it); a batch_first
// model's layer then needs no transposes of its own, which autograd would have to run.
// Layers, directions, dropout and packing are composed in Python (rnnfast/functional.py),
// which calls the forward op through rnnfast._C.layer in eager mode (csrc/python_module.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/aminmax.h>
#include <torch/library.h>

#include <sstream>
#include <utility>

#include "layer.h"

namespace rnnfast {

CellKind cell_from_name(const std::string& name) {
  std::string names;
  for (const CellName& cell : kCellNames) {
    if (name == cell.name) return cell.kind;
    names += std::string(names.empty() ? "'" : ", '") + cell.name + "'";
  }
  TORCH_CHECK_VALUE(false, "rnnfast: cell must be one of ", names, ", got '", name, "'");
}

namespace {

int gates_of(CellKind kind) {
  return dispatch_cell(kind, [](auto cell) { return decltype(cell)::kGates; });
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// Checks that `t` has exactly `expected` as its shape; the message names the argument.
void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                 const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, "rnnfast: ", name, " must have shape ", expected, " (",
              meaning, "), got ", shape_of(t));
}

void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "rnnfast: ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "rnnfast: ", name, " must be on the device of input (",
              input.device(), "), got ", t.device());
}

}  // namespace

int64_t workspace_width(CellKind kind, int64_t hidden_size, bool has_projection) {
  const int64_t saved =
      dispatch_cell(kind, [](auto cell) { return decltype(cell)::kSavedPerUnit; });
  // With a projection the LSTM also keeps the unprojected h for the gradient of w_hr.
  return (saved + (has_projection ? 1 : 0)) * hidden_size;
}

namespace {

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace

LayerArgs LayerArgs::of(c10::string_view cell, const at::Tensor& input,
                        const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh,
                        const std::optional<at::Tensor>& w_hr,
                        const std::optional<at::Tensor>& lengths, bool reverse, bool batch_first) {
  return {std::string(cell),
          input,
          value_or_undefined(hx),
          value_or_undefined(cx),
          w_ih,
          w_hh,
          value_or_undefined(b_ih),
          value_or_undefined(b_hh),
          value_or_undefined(w_hr),
          value_or_undefined(lengths),
          reverse,
          batch_first};
}

LayerArgs LayerArgs::time_major() const& { return LayerArgs(*this).time_major(); }

LayerArgs LayerArgs::time_major() && {
  input = swap_time_and_batch(input, batch_first);
  batch_first = false;
  return std::move(*this);
}

BackwardArgs BackwardArgs::of(c10::string_view cell, const at::Tensor& grad_output,
                              const std::optional<at::Tensor>& grad_h_n,
                              const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                              const std::optional<at::Tensor>& hx,
                              const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, bool has_bias,
                              const std::optional<at::Tensor>& w_hr,
                              const std::optional<at::Tensor>& lengths, bool reverse,
                              const at::Tensor& output, const at::Tensor& workspace,
                              bool input_grad, bool batch_first, bool state_grad) {
  return {LayerArgs::of(cell, input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, lengths,
                        reverse, batch_first),
          grad_output,
          value_or_undefined(grad_h_n),
          value_or_undefined(grad_c_n),
          output,
          workspace,
          has_bias,
          input_grad,
          state_grad};
}

BackwardArgs BackwardArgs::time_major() const& { return BackwardArgs(*this).time_major(); }

BackwardArgs BackwardArgs::time_major() && {
  grad_output = swap_time_and_batch(grad_output, layer.batch_first);
  output = swap_time_and_batch(output, layer.batch_first);
  layer = std::move(layer).time_major();
  return std::move(*this);
}

LayerSizes check_layer_args(const LayerArgs& args) {
  const std::string& cell = args.cell;
  const at::Tensor &input = args.input, &hx = args.hx, &cx = args.cx;
  const at::Tensor &w_ih = args.w_ih, &w_hh = args.w_hh, &b_ih = args.b_ih, &b_hh = args.b_hh;
  const at::Tensor &w_hr = args.w_hr, &lengths = args.lengths;
  LayerSizes s{};
  s.kind = cell_from_name(cell);
  TORCH_CHECK(input.dim() == 3, "rnnfast: input must be 3-D [T, B, input_size], got ", input.dim(),
              "-D input of shape ", shape_of(input));
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "rnnfast: input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(w_ih.dim() == 2,
              "rnnfast: w_ih must be 2-D [gates * hidden_size, input_size], got shape ",
              shape_of(w_ih));
  TORCH_CHECK(w_hh.dim() == 2,
              "rnnfast: w_hh must be 2-D [gates * hidden_size, state_size], got shape ",
              shape_of(w_hh));
  const int gates = gates_of(s.kind);
  s.steps = input.size(0);
  s.batch = input.size(1);
  s.input_size = input.size(2);
  s.gate_size = w_ih.size(0);
  TORCH_CHECK(s.gate_size % gates == 0 && s.gate_size > 0,
              "rnnfast: w_ih.size(0) must be a positive multiple of ", gates, " (the gates of '",
              cell, "'), got ", s.gate_size);
  s.hidden_size = s.gate_size / gates;
  s.has_projection = w_hr.defined();
  s.state_size = s.has_projection ? w_hr.size(0) : s.hidden_size;
  s.has_lengths = lengths.defined();

  TORCH_CHECK(w_ih.size(1) == s.input_size,
              "rnnfast: input.size(-1) must be equal to input_size = ", w_ih.size(1),
              " (w_ih.size(1)), got ", s.input_size);
  check_like_input(w_ih, "w_ih", input);
  if (s.has_projection) {
    TORCH_CHECK(has_cell_state(s.kind),
                "rnnfast: w_hr (a projection) is only for LSTM cells, got cell '", cell, "'");
    TORCH_CHECK(w_hr.dim() == 2 && w_hr.size(1) == s.hidden_size && w_hr.size(0) > 0 &&
                    w_hr.size(0) < s.hidden_size,
                "rnnfast: w_hr must have shape [proj_size, hidden_size = ", s.hidden_size,
                "] with 0 < proj_size < hidden_size, got ", shape_of(w_hr));
    check_like_input(w_hr, "w_hr", input);
  }
  check_shape(w_hh, "w_hh", {s.gate_size, s.state_size}, "gates * hidden_size, state_size");
  check_like_input(w_hh, "w_hh", input);
  TORCH_CHECK(b_ih.defined() == b_hh.defined(),
              "rnnfast: b_ih and b_hh must be given together or not at all");
  if (b_ih.defined()) {
    check_shape(b_ih, "b_ih", {s.gate_size}, "gates * hidden_size");
    check_like_input(b_ih, "b_ih", input);
    check_shape(b_hh, "b_hh", {s.gate_size}, "gates * hidden_size");
    check_like_input(b_hh, "b_hh", input);
  }
  s.has_initial_state = hx.defined();
  if (s.has_initial_state) {
    check_shape(hx, "hx", {s.batch, s.state_size}, "batch, state_size");
    check_like_input(hx, "hx", input);
  }
  if (has_cell_state(s.kind)) {
    if (s.has_initial_state) {
      TORCH_CHECK(cx.defined(), "rnnfast: cx (the initial cell state) is required for '", cell,
                  "' when hx is given");
      check_shape(cx, "cx", {s.batch, s.hidden_size}, "batch, hidden_size");
      check_like_input(cx, "cx", input);
    } else {
      TORCH_CHECK(
          !cx.defined(),
          "rnnfast: cx must be None when hx is None (both initial states zero), got a cx of shape ",
          shape_of(cx));
    }
  } else {
    TORCH_CHECK(!cx.defined(), "rnnfast: cx is only for LSTM cells, got one for '", cell, "'");
  }
  if (s.has_lengths) {
    TORCH_CHECK(lengths.scalar_type() == at::kLong, "rnnfast: lengths must be int64, got ",
                lengths.scalar_type());
    check_shape(lengths, "lengths", {s.batch}, "batch");
    TORCH_CHECK(lengths.device() == input.device(),
                "rnnfast: lengths must be on the device of input (", input.device(), "), got ",
                lengths.device());
    if (s.batch > 0) {
      // One host read per call (not per step): bad lengths would index out of the sequence.
      const auto range = at::aminmax(lengths);
      const int64_t lo = std::get<0>(range).item<int64_t>();
      const int64_t hi = std::get<1>(range).item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= s.steps, "rnnfast: lengths must lie in [0, T = ", s.steps,
                  "], got values from ", lo, " to ", hi);
    }
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(const LayerArgs& args,
                                                                        bool save_workspace) {
  using at::Tensor;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnfast::forward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              c10::string_view, const Tensor&, const std::optional<Tensor>&,
              const std::optional<Tensor>&, const Tensor&, const Tensor&,
              const std::optional<Tensor>&, const std::optional<Tensor>&,
              const std::optional<Tensor>&, const std::optional<Tensor>&, bool, bool, bool)>();
  return op.call(args.cell, args.input, optional_argument(args.hx), optional_argument(args.cx),
                 args.w_ih, args.w_hh, optional_argument(args.b_ih), optional_argument(args.b_hh),
                 optional_argument(args.w_hr), optional_argument(args.lengths), args.reverse,
                 save_workspace, args.batch_first);
}

void check_backward_args(const LayerSizes& s, const BackwardArgs& args) {
  const at::Tensor &input = args.layer.input, &grad_output = args.grad_output;
  const at::Tensor &grad_h_n = args.grad_h_n, &grad_c_n = args.grad_c_n;
  const at::Tensor &output = args.output, &workspace = args.workspace;
  check_shape(grad_output, "grad_output", {s.steps, s.batch, s.state_size}, "T, B, state_size");
  check_like_input(grad_output, "grad_output", input);
  if (grad_h_n.defined()) {
    check_shape(grad_h_n, "grad_h_n", {s.batch, s.state_size}, "B, state_size");
    check_like_input(grad_h_n, "grad_h_n", input);
  }
  if (grad_c_n.defined()) {
    TORCH_CHECK(has_cell_state(s.kind), "rnnfast: grad_c_n is only for LSTM cells");
    check_shape(grad_c_n, "grad_c_n", {s.batch, s.hidden_size}, "B, hidden_size");
    check_like_input(grad_c_n, "grad_c_n", input);
  }
  check_shape(output, "output", {s.steps, s.batch, s.state_size}, "T, B, state_size");
  const int64_t width = workspace_width(s.kind, s.hidden_size, s.has_projection);
  if (!s.has_lengths) {
    check_shape(workspace, "workspace", {s.steps, s.batch, width},
                "T, B, saved values; run forward with save_workspace=True");
    return;
  }
  // With lengths [rows, W]: the rows an engine saved (returned_workspace).
  TORCH_CHECK(
      workspace.dim() == 2 && workspace.size(1) == width && workspace.size(0) <= s.steps * s.batch,
      "rnnfast: workspace must have shape [rows, ", width,
      "] with rows at most T * B = ", s.steps * s.batch,
      " (a call with lengths; saved values), got ", workspace.sizes(),
      "; run forward with save_workspace=True");
}

}  // namespace rnnfast

TORCH_LIBRARY(rnnfast, m) {
  m.def(
      "forward(str cell, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, Tensor? "
      "b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool save_workspace, bool "
      "batch_first=False) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def(
      "backward(str cell, Tensor grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, bool has_bias, Tensor? w_hr, Tensor? "
      "lengths, bool reverse, Tensor output, Tensor workspace, bool input_grad, bool "
      "batch_first=False, bool state_grad=True) -> (Tensor grad_input, Tensor grad_hx, Tensor "
      "grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor "
      "grad_w_hr)");
  // One layer with cell options (csrc/layer_options.h); its autograd is in
  // csrc/options_autograd.cpp.
  m.def(
      "forward_with_options(str cell, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor "
      "w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? norm_ih_weight, Tensor? "
      "norm_hh_weight, Tensor? norm_cell_weight, Tensor? norm_cell_bias, Tensor? recurrent_mask, "
      "Tensor? zoneout_mask, Tensor? zoneout_cell_mask, float zoneout, float zoneout_cell, Tensor? "
      "lengths, bool reverse, bool save) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor "
      "cell_saved, Tensor h_prev, Tensor c_prev, Tensor h_cell, Tensor norm_ih, Tensor norm_hh, "
      "Tensor norm_cell, Tensor rstd)");
  m.def(
      "backward_with_options(str cell, Tensor grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor w_ih, Tensor w_hh, bool has_bias, Tensor? w_hr, "
      "Tensor? norm_ih_weight, Tensor? norm_hh_weight, Tensor? norm_cell_weight, bool "
      "has_norm_cell_bias, Tensor? recurrent_mask, Tensor? zoneout_mask, Tensor? "
      "zoneout_cell_mask, "
      "float zoneout, float zoneout_cell, Tensor? lengths, bool reverse, Tensor cell_saved, Tensor "
      "h_prev, Tensor c_prev, Tensor h_cell, Tensor norm_ih, Tensor norm_hh, Tensor norm_cell, "
      "Tensor rstd, bool input_grad) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr, "
      "Tensor grad_norm_ih_weight, Tensor grad_norm_hh_weight, Tensor grad_norm_cell_weight, "
      "Tensor grad_norm_cell_bias)");
  // A mask of 1 with probability p and 0 otherwise, from an int64 seed (csrc/random_masks.cpp):
  // the layers' zoneout masks on the CPU.
  m.def("random_mask(Tensor seed, SymInt[] size, float p, ScalarType dtype) -> Tensor");
  // The forward as ATen ops (csrc/differentiable_layer.cpp), differentiable to any order.
  m.def(
      "differentiable_forward(str cell, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor "
      "w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool "
      "batch_first=False) -> (Tensor output, Tensor h_n, Tensor c_n)");
}
