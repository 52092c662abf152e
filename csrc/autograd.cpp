// Autograd for rnnfast::forward: the backward is the rnnfast::backward op.
//
// Registered in C++ (the Autograd dispatch key) rather than with torch.library.register_autograd
// in Python: the Python route costs two Python-level redispatches per call, which at the small
// sizes recurrent layers often run at is more than the whole layer. The fake (shape)
// implementations stay in Python (rnnfast/_ops.py); with both, autograd, opcheck and
// torch.compile(fullgraph=True) work.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "layer.h"

namespace rnnfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor, Tensor, Tensor> call_forward(
    c10::string_view cell, const Tensor& input, const std::optional<Tensor>& hx,
    const std::optional<Tensor>& cx,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths, bool reverse, bool save_workspace) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnfast::forward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              c10::string_view, const Tensor&, const std::optional<Tensor>&,
              const std::optional<Tensor>&, const Tensor&, const Tensor&,
              const std::optional<Tensor>&,
              const std::optional<Tensor>&, const std::optional<Tensor>&,
              const std::optional<Tensor>&, bool, bool)>();
  return op.call(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                 save_workspace);
}

using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

BackwardResult call_backward(c10::string_view cell, const Tensor& grad_output,
                             const std::optional<Tensor>& grad_h_n,
                             const std::optional<Tensor>& grad_c_n, const Tensor& input,
                             const std::optional<Tensor>& hx,
                             const std::optional<Tensor>& cx, const Tensor& w_ih,
                             const Tensor& w_hh, bool has_bias,
                             const std::optional<Tensor>& w_hr,
                             const std::optional<Tensor>& lengths, bool reverse,
                             const Tensor& output, const Tensor& workspace, bool input_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnfast::backward", "")
          .typed<BackwardResult(c10::string_view, const Tensor&, const std::optional<Tensor>&,
                                const std::optional<Tensor>&, const Tensor&,
                                const std::optional<Tensor>&,
                                const std::optional<Tensor>&, const Tensor&, const Tensor&, bool,
                                const std::optional<Tensor>&, const std::optional<Tensor>&, bool,
                                const Tensor&, const Tensor&, bool)>();
  return op.call(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, has_bias,
                 w_hr, lengths, reverse, output, workspace, input_grad);
}

std::optional<Tensor> defined_or_none(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  // Argument positions, for the returned gradients.
  enum { kCell, kInput, kHx, kCx, kWih, kWhh, kBih, kBhh, kWhr, kLengths, kReverse, kSave };

  static variable_list forward(AutogradContext* ctx, c10::string_view cell, const Tensor& input,
                               const std::optional<Tensor>& hx,
                               const std::optional<Tensor>& cx,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh,
                               const std::optional<Tensor>& w_hr,
                               const std::optional<Tensor>& lengths, bool reverse,
                               bool save_workspace) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // The engines read the input contiguous: made so once here, the backward reads the same copy
    // (a batch_first input comes as a transposed view).
    const Tensor contiguous_input = time_major_contiguous(input);
    auto [output, h_n, c_n, workspace] =
        call_forward(cell, contiguous_input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                     reverse, save_workspace);
    // Outputs without a gradient (the workspace always, h_n and c_n often) reach the backward
    // undefined instead of as zero tensors of their size: it treats them as zero.
    ctx->set_materialize_grads(false);
    ctx->saved_data["cell"] = std::string(cell);
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = b_ih.has_value() && b_ih->defined();
    ctx->saved_data["saved_workspace"] = save_workspace;
    ctx->save_for_backward({contiguous_input, hx.value_or(Tensor()), cx.value_or(Tensor()),
                            w_ih, w_hh, w_hr.value_or(Tensor()), lengths.value_or(Tensor()),
                            output, workspace});
    ctx->mark_non_differentiable({workspace});
    return {output, h_n, c_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["saved_workspace"].toBool(),
                "rnnfast::forward ran with save_workspace=False, so it cannot be "
                "differentiated; call it with save_workspace=True when gradients are needed");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3];
    const Tensor &w_hh = saved[4], &w_hr = saved[5], &lengths = saved[6];
    const Tensor &output = saved[7], &workspace = saved[8];
    // With create_graph=True the incoming gradients require grad; refuse at once rather than
    // return gradients that silently act as constants in a second differentiation.
    for (const auto& grad : grads) {
      TORCH_CHECK(!(grad.defined() && grad.requires_grad()),
                  "rnnfast: double backward (gradients of gradients, create_graph=True) is not "
                  "supported");
    }
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    // Absent gradients of h_n and c_n are zero: the backward op takes None for them.
    // needs_input_grad counts tensor arguments only: input is the first of them.
    const bool input_grad = ctx->needs_input_grad(0);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::string& cell = ctx->saved_data["cell"].toStringRef();
    const auto grad_c_n =
        has_cell_state(cell_from_name(cell)) ? defined_or_none(grads[2]) : std::nullopt;
    auto [g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr] = call_backward(
        cell, grad_output, defined_or_none(grads[1]), grad_c_n, input, defined_or_none(hx),
        defined_or_none(cx), w_ih, w_hh, has_bias, defined_or_none(w_hr),
        defined_or_none(lengths), ctx->saved_data["reverse"].toBool(), output, workspace,
        input_grad);
    variable_list result(kSave + 1);
    result[kInput] = input_grad ? g_input : Tensor();
    result[kHx] = hx.defined() ? g_hx : Tensor();
    result[kCx] = cx.defined() ? g_cx : Tensor();
    result[kWih] = g_w_ih;
    result[kWhh] = g_w_hh;
    result[kBih] = has_bias ? g_b_ih : Tensor();
    result[kBhh] = has_bias ? g_b_hh : Tensor();
    result[kWhr] = w_hr.defined() ? g_w_hr : Tensor();
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_autograd(
    c10::string_view cell, const Tensor& input, const std::optional<Tensor>& hx,
    const std::optional<Tensor>& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& lengths, bool reverse,
    bool save_workspace) {
  const auto requires_grad = [](const std::optional<Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  const bool differentiable =
      torch::autograd::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(hx) || w_ih.requires_grad() ||
       w_hh.requires_grad() || requires_grad(cx) || requires_grad(b_ih) || requires_grad(b_hh) ||
       requires_grad(w_hr));
  if (!differentiable) {
    // Inference: no graph to record, so skip the autograd Function's bookkeeping.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                        save_workspace);
  }
  auto results = LayerFunction::apply(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                      reverse, save_workspace);
  return {results[0], results[1], results[2], results[3]};
}

// The backward op has no derivative of its own: asking for one is an error, not a silent zero.
BackwardResult backward_autograd(c10::string_view cell, const Tensor& grad_output,
                                 const std::optional<Tensor>& grad_h_n,
                                 const std::optional<Tensor>& grad_c_n, const Tensor& input,
                                 const std::optional<Tensor>& hx,
                                 const std::optional<Tensor>& cx, const Tensor& w_ih,
                                 const Tensor& w_hh, bool has_bias,
                                 const std::optional<Tensor>& w_hr,
                                 const std::optional<Tensor>& lengths, bool reverse,
                                 const Tensor& output, const Tensor& workspace, bool input_grad) {
  if (torch::autograd::GradMode::is_enabled()) {
    for (const Tensor& t : {grad_output, grad_h_n.value_or(Tensor()), input,
                            hx.value_or(Tensor()), w_ih, w_hh, output}) {
      TORCH_CHECK(!(t.defined() && t.requires_grad()),
                  "rnnfast: double backward (gradients of gradients) is not supported");
    }
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_backward(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh,
                       has_bias, w_hr, lengths, reverse, output, workspace, input_grad);
}

}  // namespace
}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, Autograd, m) {
  m.impl("forward", &rnnfast::forward_autograd);
  m.impl("backward", &rnnfast::backward_autograd);
}
