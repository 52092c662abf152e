// Autograd for rnnfast::forward_with_options (the layer with cell options, layer_options.h): the
// backward is the rnnfast::backward_with_options op.
//
// A graph node in C++, as rnnfast::forward's (autograd.cpp), rather than an autograd formula
// registered from Python: the Python route (an autograd.Function's context, the saving of
// nineteen tensors, a backward that builds the op's twenty-nine arguments) cost a tenth of the
// training step of a 16-row, 64-unit LSTM with zoneout. The fake (shape) implementations stay in
// Python (rnnfast/_options_ops.py), as does the autograd.Function that torch.func's transforms
// take, which refuse C++ nodes.
//
// The layer has first derivatives only: a backward with create_graph=True, forward-mode AD and
// the backward op's own derivative raise (kFirstDerivativesOnly).
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "graph_node.h"
#include "layer.h"
#include "layer_options.h"

namespace rnnfast {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The start of the error of every derivative the layer does not have (rnnfast/_options_ops.py
// raises the same for torch.func's transforms).
constexpr const char* kFirstDerivativesOnly =
    "rnnfast: the layers with cell options (layer_norm, zoneout, dropout masks) have first "
    "derivatives only: ";
// Its end where a gradient would be differentiated.
constexpr const char* kNotDifferentiable =
    "their gradients cannot be taken with create_graph=True, nor differentiated";

using ForwardResults = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor, Tensor, Tensor>;

constexpr char kForwardWithOptions[] = "rnnfast::forward_with_options";
constexpr char kBackwardWithOptions[] = "rnnfast::backward_with_options";

// The op `Name` called through the dispatcher, from the dispatch keys the calling thread is at;
// Signature: its C++ function type (its autograd kernel's, below).
template <const char* Name, typename Signature, typename... Args>
decltype(auto) call_op(Args&&... args) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").typed<Signature>();
  return op.call(std::forward<Args>(args)...);
}

// The graph node of one differentiable forward_with_options call.
struct LayerWithOptionsBackward final : public torch::autograd::Node {
  // Gradient slots (next edges): the forward's differentiable arguments in their order, which
  // is also the order of backward_with_options's results (kGradInput .. kGradNormCellBias).
  static constexpr int kSlots = kLayerOptionsGradients;

  variable_list apply(variable_list&& grads) override;
  std::string name() const override { return "rnnfast::LayerWithOptionsBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved :
         {&input_, &w_ih_, &w_hh_, &w_hr_, &norm_ih_weight_, &norm_hh_weight_, &norm_cell_weight_,
          &recurrent_mask_, &zoneout_mask_, &zoneout_cell_mask_, &lengths_, &cell_saved_, &h_prev_,
          &c_prev_, &h_cell_, &norm_ih_, &norm_hh_, &norm_cell_, &rstd_}) {
      saved->reset_data();
    }
  }

  std::string cell;
  bool has_bias = false, has_norm_cell_bias = false, reverse = false;
  double zoneout = 0, zoneout_cell = 0;
  // The arguments the backward reads (an absent optional one saved undefined), and what the
  // forward saved for it.
  SavedVariable input_, w_ih_, w_hh_, w_hr_, norm_ih_weight_, norm_hh_weight_, norm_cell_weight_,
      recurrent_mask_, zoneout_mask_, zoneout_cell_mask_, lengths_;
  SavedVariable cell_saved_, h_prev_, c_prev_, h_cell_, norm_ih_, norm_hh_, norm_cell_, rstd_;
};

optional<Tensor> optional_of(const SavedVariable& saved) {
  Tensor t = saved.unpack();
  return t.defined() ? optional<Tensor>(std::move(t)) : std::nullopt;
}

// The backward op has no derivative of its own: asking for one is an error, not a silent zero.
LayerOptionsGradients backward_with_options_autograd(
    c10::string_view cell, const Tensor& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    bool has_bias, const optional<Tensor>& w_hr, const optional<Tensor>& norm_ih_weight,
    const optional<Tensor>& norm_hh_weight, const optional<Tensor>& norm_cell_weight,
    bool has_norm_cell_bias, const optional<Tensor>& recurrent_mask,
    const optional<Tensor>& zoneout_mask, const optional<Tensor>& zoneout_cell_mask, double zoneout,
    double zoneout_cell, const optional<Tensor>& lengths, bool reverse, const Tensor& cell_saved,
    const Tensor& h_prev, const Tensor& c_prev, const Tensor& h_cell, const Tensor& norm_ih,
    const Tensor& norm_hh, const Tensor& norm_cell, const Tensor& rstd, bool input_grad) {
  TORCH_CHECK(!torch::autograd::compute_requires_grad(
                  grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, w_hr, norm_ih_weight,
                  norm_hh_weight, norm_cell_weight, cell_saved, h_prev, c_prev, h_cell),
              kFirstDerivativesOnly, kNotDifferentiable);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_op<kBackwardWithOptions, decltype(backward_with_options_autograd)>(
      cell, grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, has_bias, w_hr, norm_ih_weight,
      norm_hh_weight, norm_cell_weight, has_norm_cell_bias, recurrent_mask, zoneout_mask,
      zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse, cell_saved, h_prev, c_prev,
      h_cell, norm_ih, norm_hh, norm_cell, rstd, input_grad);
}

variable_list LayerWithOptionsBackward::apply(variable_list&& grads) {
  // The engine runs a backward with grad mode on exactly when create_graph=True.
  TORCH_CHECK(!at::GradMode::is_enabled(), kFirstDerivativesOnly, kNotDifferentiable);
  // grads: those of (output, h_n, c_n), undefined where no gradient flows (taken as zero).
  const Tensor input = input_.unpack(), w_hh = w_hh_.unpack();
  const Tensor grad_output =
      grads[0].defined()
          ? grads[0]
          : at::zeros_symint({input.sym_size(0), input.sym_size(1), w_hh.sym_size(1)},
                             input.options());
  const bool has_cell_state = rnnfast::has_cell_state(cell_from_name(cell));
  const auto present = [](const Tensor& t) {
    return t.defined() ? optional<Tensor>(t) : std::nullopt;
  };
  LayerOptionsGradients gradients =
      call_op<kBackwardWithOptions, decltype(backward_with_options_autograd)>(
          cell, grad_output, present(grads[1]), has_cell_state ? present(grads[2]) : std::nullopt,
          input, w_ih_.unpack(), w_hh, has_bias, optional_of(w_hr_), optional_of(norm_ih_weight_),
          optional_of(norm_hh_weight_), optional_of(norm_cell_weight_), has_norm_cell_bias,
          optional_of(recurrent_mask_), optional_of(zoneout_mask_), optional_of(zoneout_cell_mask_),
          zoneout, zoneout_cell, optional_of(lengths_), reverse, cell_saved_.unpack(),
          h_prev_.unpack(), c_prev_.unpack(), h_cell_.unpack(), norm_ih_.unpack(),
          norm_hh_.unpack(), norm_cell_.unpack(), rstd_.unpack(),
          task_should_compute_output(kGradInput));
  // The op returns empty tensors for the arguments the call did not have; their slots, and
  // those of gradients not asked for, stay undefined.
  variable_list result(kSlots);
  std::apply(
      [&](auto&... gradient) {
        int slot = 0;
        ((result[slot] = task_should_compute_output(slot) ? std::move(gradient) : Tensor(), ++slot),
         ...);
      },
      gradients);
  return result;
}

ForwardResults forward_with_options_autograd(
    c10::string_view cell, const Tensor& input, const optional<Tensor>& hx,
    const optional<Tensor>& cx, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
    const optional<Tensor>& norm_ih_weight, const optional<Tensor>& norm_hh_weight,
    const optional<Tensor>& norm_cell_weight, const optional<Tensor>& norm_cell_bias,
    const optional<Tensor>& recurrent_mask, const optional<Tensor>& zoneout_mask,
    const optional<Tensor>& zoneout_cell_mask, double zoneout, double zoneout_cell,
    const optional<Tensor>& lengths, bool reverse, bool save) {
  const auto run = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_op<kForwardWithOptions, decltype(forward_with_options_autograd)>(
        cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, norm_ih_weight, norm_hh_weight,
        norm_cell_weight, norm_cell_bias, recurrent_mask, zoneout_mask, zoneout_cell_mask, zoneout,
        zoneout_cell, lengths, reverse, save);
  };
  // (The masks are constants of the call: they get no gradient.)
  if (!torch::autograd::compute_requires_grad(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr,
                                              norm_ih_weight, norm_hh_weight, norm_cell_weight,
                                              norm_cell_bias)) {
    return run();
  }
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
    // torch.func's transforms take the Python autograd.Function (rnnfast/functional.py) and
    // refuse a C++ node: refused here too rather than computing wrong gradients.
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  for (const auto& t :
       {optional<Tensor>(input), hx, cx, optional<Tensor>(w_ih), optional<Tensor>(w_hh), b_ih, b_hh,
        w_hr, norm_ih_weight, norm_hh_weight, norm_cell_weight, norm_cell_bias}) {
    TORCH_CHECK(!torch::autograd::isFwGradDefined(t), kFirstDerivativesOnly,
                "forward-mode AD (dual tensors) cannot differentiate them");
  }
  TORCH_CHECK(save,
              "rnnfast: forward_with_options was run with save=False, so it cannot be "
              "differentiated; run it with save=True where a gradient is wanted");
  const auto node = make_node<LayerWithOptionsBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                                           w_hr, norm_ih_weight, norm_hh_weight,
                                                           norm_cell_weight, norm_cell_bias));
  ForwardResults results = run();
  auto& [output, h_n, c_n, cell_saved, h_prev, c_prev, h_cell, norm_ih, norm_hh, norm_cell, rstd] =
      results;
  // output, h_n and c_n are the node's differentiable outputs, in this order (its grads); what
  // the backward reads gets no history.
  torch::autograd::set_history({output, h_n, c_n}, node);
  node->cell = std::string(cell);
  node->has_bias = b_ih.has_value() && b_ih->defined();
  node->has_norm_cell_bias = norm_cell_bias.has_value() && norm_cell_bias->defined();
  node->reverse = reverse;
  node->zoneout = zoneout;
  node->zoneout_cell = zoneout_cell;
  node->input_ = SavedVariable(input, false);
  node->w_ih_ = SavedVariable(w_ih, false);
  node->w_hh_ = SavedVariable(w_hh, false);
  node->w_hr_ = SavedVariable(w_hr, false);
  node->norm_ih_weight_ = SavedVariable(norm_ih_weight, false);
  node->norm_hh_weight_ = SavedVariable(norm_hh_weight, false);
  node->norm_cell_weight_ = SavedVariable(norm_cell_weight, false);
  node->recurrent_mask_ = SavedVariable(recurrent_mask, false);
  node->zoneout_mask_ = SavedVariable(zoneout_mask, false);
  node->zoneout_cell_mask_ = SavedVariable(zoneout_cell_mask, false);
  node->lengths_ = SavedVariable(lengths, false);
  node->cell_saved_ = SavedVariable(cell_saved, false);
  node->h_prev_ = SavedVariable(h_prev, false);
  node->c_prev_ = SavedVariable(c_prev, false);
  node->h_cell_ = SavedVariable(h_cell, false);
  node->norm_ih_ = SavedVariable(norm_ih, false);
  node->norm_hh_ = SavedVariable(norm_hh, false);
  node->norm_cell_ = SavedVariable(norm_cell, false);
  node->rstd_ = SavedVariable(rstd, false);
  return results;
}

}  // namespace
}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, Autograd, m) {
  m.impl("forward_with_options", &rnnfast::forward_with_options_autograd);
  m.impl("backward_with_options", &rnnfast::backward_with_options_autograd);
}
