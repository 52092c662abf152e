// One layer in one direction as a composition of ATen ops, differentiable to any order.
//
// The fused engines compute first derivatives only. Where autograd must record the gradient
// computation itself (a backward with create_graph=True: gradgradcheck, Hessians, gradient
// penalties), forward-mode AD, or torch.func's nested transforms, the layer runs (or is
// recomputed) as this composition instead, and autograd differentiates it. The cell math is
// csrc/cells.h's, instantiated with whole [B, H] tensors as its values, so it is not written
// a second time.
#include <ATen/TensorOperators.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <vector>

#include "layer.h"

namespace rnnfast {

// One step's gate pre-activations [B, G] (G = gates * H), as cells.h's forward reads them: gate
// k of every unit is the column block [k * H, (k + 1) * H).
struct GateColumns {
  at::Tensor gates;
};

// The cells' unit index standing for all H units of every batch row at once.
struct AllUnits {
  int64_t units;
};

template <typename A>
A load(const GateColumns* step, int offset, AllUnits all) {
  return step->gates.narrow(1, offset, all.units);
}

// The cells' forward stores its saved values through this when given a buffer for them; the
// composition never does (autograd keeps what it needs), but the call must compile.
inline void store(GateColumns* step, int offset, AllUnits all, const at::Tensor& value) {
  step->gates.narrow(1, offset, all.units).copy_(value);
}

template <>
struct Math<at::Tensor> {
  static at::Tensor sigmoid(const at::Tensor& x) { return at::sigmoid(x); }
  static at::Tensor tanh(const at::Tensor& x) { return at::tanh(x); }
  static at::Tensor relu(const at::Tensor& x) { return at::relu(x); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_layer(const LayerArgs& call) {
  const LayerArgs args = call.time_major();
  const at::Tensor& x = args.input;  // [T, B, I]
  const LayerSizes sizes = check_layer_args(args);
  const int64_t steps = sizes.steps, batch = sizes.batch, hidden = sizes.hidden_size;
  const bool reverse = args.reverse;

  // The input projection of every step at once, [T, B, G]; the recurrent one per step.
  const at::Tensor input_gates = at::linear(x, args.w_ih, optional_argument(args.b_ih));
  const std::optional<at::Tensor> b_hh = optional_argument(args.b_hh);
  at::Tensor h = args.hx.defined() ? args.hx : x.new_zeros({batch, sizes.state_size});
  at::Tensor c;
  if (has_cell_state(sizes.kind)) {
    c = args.cx.defined() ? args.cx : x.new_zeros({batch, hidden});
  }
  // Row b runs steps t < lengths[b] (a reversed row starts at its own last step): [B, 1].
  at::Tensor row_lengths;
  if (sizes.has_lengths) row_lengths = args.lengths.to(x.device()).unsqueeze(1);

  std::vector<at::Tensor> outputs(steps);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    GateColumns xg{input_gates[t]};
    GateColumns hg{at::linear(h, args.w_hh, b_hh)};
    at::Tensor h_new, c_new;
    dispatch_cell(sizes.kind, [&](auto cell_type) {
      decltype(cell_type)::template forward<at::Tensor>(static_cast<int>(hidden), AllUnits{hidden},
                                                        &xg, &hg, h, c, h_new, c_new,
                                                        static_cast<GateColumns*>(nullptr));
    });
    if (sizes.has_projection) h_new = at::linear(h_new, args.w_hr);
    if (sizes.has_lengths) {
      const at::Tensor running = row_lengths > t;
      outputs[t] = at::where(running, h_new, 0);
      h = at::where(running, h_new, h);
      if (c.defined()) c = at::where(running, c_new, c);
    } else {
      outputs[t] = h_new;
      h = h_new;
      c = c_new;
    }
  }
  const at::Tensor output =
      steps > 0 ? at::stack(outputs) : x.new_empty({0, batch, sizes.state_size});
  return {swap_time_and_batch(output, call.batch_first), h, c.defined() ? c : x.new_empty(0)};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_forward(
    c10::string_view cell, const at::Tensor& input, const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths, bool reverse,
    bool batch_first) {
  return differentiable_layer(LayerArgs::of(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr,
                                            lengths, reverse, batch_first));
}

}  // namespace

}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, CompositeImplicitAutograd, m) {
  m.impl("differentiable_forward", &rnnfast::differentiable_forward);
}
