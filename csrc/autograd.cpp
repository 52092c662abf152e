// Autograd for rnnfast::forward: the backward is the rnnfast::backward op.
//
// Registered in C++ (the Autograd dispatch key) rather than with torch.library.register_autograd
// in Python: the Python route costs two Python-level redispatches per call, which at the small
// sizes recurrent layers often run at is more than the whole layer. The fake (shape)
// implementations stay in Python (rnnfast/_ops.py); with both, autograd, opcheck and
// torch.compile(fullgraph=True) work.
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <utility>

#include "graph_node.h"
#include "layer.h"

namespace rnnfast {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// rnnfast::backward called through the dispatcher, from the dispatch keys the calling thread is
// at.
BackwardResult call_backward(const BackwardArgs& args) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnfast::backward", "")
          .typed<BackwardResult(c10::string_view, const Tensor&, const std::optional<Tensor>&,
                                const std::optional<Tensor>&, const Tensor&,
                                const std::optional<Tensor>&, const std::optional<Tensor>&,
                                const Tensor&, const Tensor&, bool, const std::optional<Tensor>&,
                                const std::optional<Tensor>&, bool, const Tensor&, const Tensor&,
                                bool, bool, bool)>();
  const LayerArgs& layer = args.layer;
  return op.call(layer.cell, args.grad_output, optional_argument(args.grad_h_n),
                 optional_argument(args.grad_c_n), layer.input, optional_argument(layer.hx),
                 optional_argument(layer.cx), layer.w_ih, layer.w_hh, args.has_bias,
                 optional_argument(layer.w_hr), optional_argument(layer.lengths), layer.reverse,
                 args.output, args.workspace, args.input_grad, layer.batch_first, args.state_grad);
}

// The graph node of one differentiable rnnfast::forward call; its backward is the
// rnnfast::backward op. A Node of its own, as torch's generated ops have, rather than a
// torch::autograd::Function: the Function's generic bookkeeping (a context with a string-keyed
// map, per-input and per-output metadata, output wrapping, a mutex) cost more than the whole
// layer's math at the small sizes recurrent layers often run at.
struct LayerBackward final : public torch::autograd::Node {
  // Gradient slots (next edges), in the forward's argument order.
  enum Slot { kInput, kHx, kCx, kWih, kWhh, kBih, kBhh, kWhr, kSlots };

  variable_list apply(variable_list&& grads) override;
  // apply under create_graph=True: the gradients recorded by autograd, to any order.
  variable_list apply_differentiably(const variable_list& grads);
  std::string name() const override { return "rnnfast::LayerBackward"; }
  // Called by the engine before apply where it releases the graph after (retain_graph=False).
  void will_release_variables() override { releasing_ = true; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&input_, &hx_, &cx_, &w_ih_, &w_hh_, &b_ih_, &b_hh_, &w_hr_,
                                 &lengths_, &output_, &workspace_}) {
      saved->reset_data();
    }
  }

  std::string cell;
  bool reverse = false;
  bool has_bias = false;
  bool saved_workspace = false;
  bool batch_first = false;
  // input_ is the caller's input where the engine reads a view of it, so that its version
  // counter catches in-place changes made before the backward (the view made below autograd
  // has a counter of its own), else the engine's time-major copy (engine_input); output_ the
  // output as the forward returned it (batch_first: [B, T, P]); an absent optional tensor is
  // saved undefined and unpacks undefined. The biases are read by apply_differentiably only.
  bool saved_caller_input = false;
  SavedVariable input_, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, lengths_, output_, workspace_;
  // output_ holds the output's data under a version counter of its own: torch.nn's GRU and RNN
  // layers let the caller change their output in place before the backward (their graphs keep
  // copies of the states), which a saved output would refuse. output_version is the version
  // counter of the output the caller got, and output_saved_version its version when saved:
  // where it has moved, the backward computes the output again (forward_output_again) rather
  // than read the changed values.
  c10::VariableVersion output_version;
  uint32_t output_saved_version = 0;

 private:
  // The forward's output [T, B, P], computed again from the saved inputs (time-major, as the
  // backward op reads them): the same call of the same kernels, so the same values.
  Tensor forward_output_again(const Tensor& input, const Tensor& hx, const Tensor& cx,
                              const Tensor& w_ih, const Tensor& w_hh, const Tensor& w_hr,
                              const Tensor& lengths);

  bool releasing_ = false;
};

Tensor LayerBackward::forward_output_again(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                           const Tensor& w_ih, const Tensor& w_hh,
                                           const Tensor& w_hr, const Tensor& lengths) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LayerArgs args{
      cell,           input,          hx,   cx,      w_ih,    w_hh,
      b_ih_.unpack(), b_hh_.unpack(), w_hr, lengths, reverse, /*batch_first=*/false};
  return std::get<0>(call_forward(args, /*save_workspace=*/true));
}

variable_list LayerBackward::apply(variable_list&& grads) {
  // grads: those of (output, h_n, c_n), undefined where no gradient flows (taken as zero).
  TORCH_CHECK(saved_workspace,
              "rnnfast::forward ran with save_workspace=False, so it cannot be differentiated; "
              "call it with save_workspace=True when gradients are needed");
  // The engine runs a backward with grad mode on exactly when create_graph=True.
  if (at::GradMode::is_enabled()) return apply_differentiably(grads);
  const auto self = getptr();
  const Tensor input =
      saved_caller_input ? swap_time_and_batch(input_.unpack(), batch_first) : input_.unpack();
  const Tensor hx = hx_.unpack(), cx = cx_.unpack();
  const Tensor w_ih = w_ih_.unpack(), w_hh = w_hh_.unpack(), w_hr = w_hr_.unpack();
  const Tensor lengths = lengths_.unpack();
  Tensor workspace = workspace_.unpack();
  // Released after this call anyway: where nothing else holds the workspace once this node lets
  // go of it, the backward op may write over it (WorkspaceHandover), which saves it a buffer of
  // the gate gradients.
  std::optional<WorkspaceHandover> handover;
  if (releasing_) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      workspace_.reset_data();
    }
    if (workspace.use_count() == 1 && workspace.storage().use_count() == 1) {
      handover.emplace(workspace);
    }
  }
  // The backward op runs time-major: the batch_first output and its gradient as views.
  const Tensor output = output_version.current_version() == output_saved_version
                            ? swap_time_and_batch(output_.unpack(self), batch_first)
                            : forward_output_again(input, hx, cx, w_ih, w_hh, w_hr, lengths);
  const Tensor grad_output =
      grads[0].defined() ? swap_time_and_batch(grads[0], batch_first) : at::zeros_like(output);
  const bool input_grad = task_should_compute_output(kInput);
  const bool state_grad = task_should_compute_output(kHx) || task_should_compute_output(kCx);
  BackwardArgs args;
  args.layer = {cell,
                input,
                hx,
                cx,
                w_ih,
                w_hh,
                Tensor(),
                Tensor(),
                w_hr,
                lengths,
                reverse,
                /*batch_first=*/false};
  args.grad_output = grad_output;
  args.grad_h_n = grads[1];
  args.grad_c_n = has_cell_state(cell_from_name(cell)) ? grads[2] : Tensor();
  args.output = output;
  args.workspace = workspace;
  args.has_bias = has_bias;
  args.input_grad = input_grad;
  args.state_grad = state_grad;
  auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr] = call_backward(args);
  // The op returns empty tensors for gradients it did not compute; their slots stay undefined.
  variable_list result(kSlots);
  if (input_grad) result[kInput] = swap_time_and_batch(g_input, batch_first);
  if (hx.defined() && state_grad) result[kHx] = std::move(g_hx);
  if (cx.defined() && state_grad) result[kCx] = std::move(g_cx);
  result[kWih] = std::move(g_w_ih);
  result[kWhh] = std::move(g_w_hh);
  if (has_bias) {
    result[kBih] = std::move(g_b_ih);
    result[kBhh] = std::move(g_b_hh);
  }
  if (w_hr.defined()) result[kWhr] = std::move(g_w_hr);
  return result;
}

variable_list LayerBackward::apply_differentiably(const variable_list& grads) {
  // The layer is recomputed as ATen ops (differentiable_layer) from fresh handles on the saved
  // inputs, each handle given this node's edge for its input as its own gradient edge: the
  // recomputed graph then continues into the graph this node continues into, and the
  // gradients autograd computes of it (a reentrant backward) carry their own history.
  std::array<Tensor, kSlots> handles;
  std::vector<Tensor> differentiable;
  std::vector<size_t> differentiable_slots;
  const auto handle_on = [&](const Tensor& value, Slot slot) {
    if (!value.defined()) return;
    handles[slot] = value.variable_data();
    const auto& edge = next_edge(slot);
    if (!edge.is_valid()) return;
    // Every input with an edge joins the recorded graph (a later differentiation may reach
    // it); the reentrant backward computes the gradients this backward was asked for.
    torch::autograd::impl::set_gradient_edge(handles[slot], edge);
    if (task_should_compute_output(slot)) {
      differentiable.push_back(handles[slot]);
      differentiable_slots.push_back(slot);
    }
  };
  // The input as the caller passed it ([B, T, I] when batch_first), so that its gradient has
  // the shape of the input's edge.
  handle_on(
      saved_caller_input ? input_.unpack() : swap_time_and_batch(input_.unpack(), batch_first),
      kInput);
  handle_on(hx_.unpack(), kHx);
  handle_on(cx_.unpack(), kCx);
  handle_on(w_ih_.unpack(), kWih);
  handle_on(w_hh_.unpack(), kWhh);
  handle_on(b_ih_.unpack(), kBih);
  handle_on(b_hh_.unpack(), kBhh);
  handle_on(w_hr_.unpack(), kWhr);
  variable_list result(kSlots);
  if (differentiable.empty()) return result;
  const auto [output, h_n, c_n] = differentiable_layer(
      {cell, handles[kInput], handles[kHx], handles[kCx], handles[kWih], handles[kWhh],
       handles[kBih], handles[kBhh], handles[kWhr], lengths_.unpack(), reverse, batch_first});
  variable_list outputs, output_grads;
  const std::array<Tensor, 3> recomputed{output, h_n, c_n};
  for (size_t k = 0; k < grads.size(); ++k) {
    if (grads[k].defined() && recomputed[k].requires_grad()) {
      outputs.push_back(recomputed[k]);
      output_grads.push_back(grads[k]);
    }
  }
  if (outputs.empty()) return result;
  const variable_list gradients =
      torch::autograd::grad(outputs, differentiable, output_grads, /*retain_graph=*/true,
                            /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < gradients.size(); ++k) {
    result[differentiable_slots[k]] = gradients[k];
  }
  return result;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_autograd(
    c10::string_view cell, const Tensor& input, const std::optional<Tensor>& hx,
    const std::optional<Tensor>& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& lengths, bool reverse,
    bool save_workspace, bool batch_first) {
  const LayerArgs args = LayerArgs::of(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                       reverse, batch_first);
  if (!torch::autograd::compute_requires_grad(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)) {
    // Inference: no graph to record.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(args, save_workspace);
  }
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
    // torch.func transforms need a Python-level autograd.Function; refuse as torch does for
    // C++ autograd functions rather than compute silently wrong gradients.
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  for (const auto& t : {std::optional<Tensor>(input), hx, cx, std::optional<Tensor>(w_ih),
                        std::optional<Tensor>(w_hh), b_ih, b_hh, w_hr}) {
    if (torch::autograd::isFwGradDefined(t)) {
      // Forward-mode AD (dual tensors): the ATen ops of the composition carry the tangents.
      auto [output, h_n, c_n] = differentiable_layer(args);
      return {output, h_n, c_n, input.new_empty(0)};
    }
  }
  const auto node = make_node<LayerBackward>();
  node->set_next_edges(
      torch::autograd::collect_next_edges(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr));
  Tensor time_major_input, engine_read_input, output, h_n, c_n, workspace;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // The time-major input as the engine reads it, made so once here (the view of a
    // batch_first one most engines copy): the backward reads the same. The op runs time-major
    // here; a batch_first output is the view the op would have returned.
    LayerArgs engine_args = args.time_major();
    time_major_input = engine_args.input;
    // A tensor of symbolic sizes (torch.compile or torch.export tracing with dynamic shapes)
    // gets the contiguous copy: engine_input's choice reads concrete sizes, which would
    // specialise the trace to them. The traced graph then holds the copy (a clone) before the
    // op, as eager calls make it for every input but the tiniest layers' (which the CPU
    // engine's register layer reads as they come).
    engine_read_input =
        time_major_input.unsafeGetTensorImpl()->has_symbolic_sizes_strides()
            ? time_major_contiguous(time_major_input)
            : engine_input(time_major_input, w_hh, args.lengths.defined(), args.w_hr.defined());
    engine_args.input = engine_read_input;
    std::tie(output, h_n, c_n, workspace) = call_forward(engine_args, save_workspace);
    output = swap_time_and_batch(output, batch_first);
  }
  // output, h_n and c_n are the node's differentiable outputs, in this order (its grads); the
  // workspace is not differentiable and gets no history.
  torch::autograd::set_history({output, h_n, c_n}, node);
  node->cell = std::string(cell);
  node->reverse = reverse;
  node->has_bias = args.b_ih.defined();
  node->saved_workspace = save_workspace;
  node->batch_first = batch_first;
  node->saved_caller_input = engine_read_input.is_same(time_major_input);
  node->input_ = SavedVariable(node->saved_caller_input ? input : engine_read_input, false);
  node->hx_ = SavedVariable(hx, false);
  node->cx_ = SavedVariable(cx, false);
  node->w_ih_ = SavedVariable(w_ih, false);
  node->w_hh_ = SavedVariable(w_hh, false);
  node->b_ih_ = SavedVariable(b_ih, false);
  node->b_hh_ = SavedVariable(b_hh, false);
  node->w_hr_ = SavedVariable(w_hr, false);
  node->lengths_ = SavedVariable(lengths, false);
  node->output_ = SavedVariable(output.variable_data(), false);
  node->output_version = output.unsafeGetTensorImpl()->version_counter();
  node->output_saved_version = output._version();
  node->workspace_ = SavedVariable(workspace, false);
  return {output, h_n, c_n, workspace};
}

}  // namespace

bool share_saved_output(const Tensor& output, const Tensor& replacement) {
  auto* node = dynamic_cast<LayerBackward*>(output.grad_fn().get());
  if (node == nullptr || !node->saved_workspace) return false;
  // Only the output this node saved, from its own call.
  const Tensor saved = node->output_.unpack(output.grad_fn());
  if (!saved.defined() || saved.data_ptr() != output.data_ptr() ||
      !saved.sizes().equals(output.sizes()) || !saved.strides().equals(output.strides())) {
    return false;
  }
  TORCH_CHECK(replacement.sizes().equals(output.sizes()) && replacement.dtype() == output.dtype() &&
                  replacement.device() == output.device(),
              "share_saved_output: the replacement must have the output's shape, dtype and "
              "device; got ",
              replacement.sizes(), " ", replacement.dtype(), " for ", output.sizes(), " ",
              output.dtype());
  // Saved as its data: the node then holds no reference to the replacement's history, which
  // continues from this node (a cycle otherwise). The version the backward checks is the
  // replacement's: changed in place, the backward computes the output again.
  node->output_ = SavedVariable(replacement.variable_data(), /*is_output=*/false);
  node->output_version = replacement.unsafeGetTensorImpl()->version_counter();
  node->output_saved_version = replacement._version();
  return true;
}

namespace {

// The backward op has no derivative of its own: asking for one is an error, not a silent zero.
BackwardResult backward_autograd(c10::string_view cell, const Tensor& grad_output,
                                 const std::optional<Tensor>& grad_h_n,
                                 const std::optional<Tensor>& grad_c_n, const Tensor& input,
                                 const std::optional<Tensor>& hx, const std::optional<Tensor>& cx,
                                 const Tensor& w_ih, const Tensor& w_hh, bool has_bias,
                                 const std::optional<Tensor>& w_hr,
                                 const std::optional<Tensor>& lengths, bool reverse,
                                 const Tensor& output, const Tensor& workspace, bool input_grad,
                                 bool batch_first, bool state_grad) {
  if (torch::autograd::GradMode::is_enabled()) {
    for (const Tensor& t : {grad_output, grad_h_n.value_or(Tensor()), input, hx.value_or(Tensor()),
                            w_ih, w_hh, output}) {
      TORCH_CHECK(!(t.defined() && t.requires_grad()),
                  "rnnfast: double backward (gradients of gradients) is not supported");
    }
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_backward(BackwardArgs::of(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih,
                                        w_hh, has_bias, w_hr, lengths, reverse, output, workspace,
                                        input_grad, batch_first, state_grad));
}

}  // namespace
}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, Autograd, m) {
  m.impl("forward", &rnnfast::forward_autograd);
  m.impl("backward", &rnnfast::backward_autograd);
}
