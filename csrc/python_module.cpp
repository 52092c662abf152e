// The Python module rnnfast._C: importing it loads the op registrations (ops.cpp, autograd.cpp,
// the engines); its functions are the eager entry to the forward op and the CPU buffer pool's
// controls.
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/dropout.h>
#include <ATen/ops/stack.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "buffer_pool.h"
#include "cpu/engine.h"
#include "layer.h"

namespace {

using at::Tensor;

// A tensor argument as the op takes it, or nullopt where it is None; also nullopt, with *plain
// set false, where it is anything but exactly a torch.Tensor or an nn.Parameter.
std::optional<Tensor> optional_tensor(PyObject* object, bool* plain) {
  if (object == Py_None) return std::nullopt;
  if (!THPVariable_CheckExact(object)) {
    *plain = false;
    return std::nullopt;
  }
  return THPVariable_Unpack(object);
}

// A Python tuple of the tensors, None for an undefined one.
PyObject* tensor_tuple(std::vector<Tensor> tensors) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(tensors.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* item = Py_None;
    if (tensors[i].defined()) {
      item = THPVariable_Wrap(std::move(tensors[i]));
    } else {
      Py_INCREF(Py_None);
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), item);
  }
  return tuple;
}

// rnnfast::call_forward(args), saving the workspace where a gradient will be asked for: grad
// mode on and a tensor argument requiring grad, or a trace being recorded. torch.jit.trace
// records the flag as a constant, which the traced module then passes in any grad mode (and the
// trace's check runs under no_grad): a trace always saves the workspace, so that the traced
// module can be differentiated.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_saving_as_needed(
    const rnnfast::LayerArgs& args) {
  const bool save_workspace =
      torch::jit::tracer::isTracing() ||
      torch::autograd::compute_requires_grad(args.input, args.hx, args.cx, args.w_ih, args.w_hh,
                                             args.b_ih, args.b_hh, args.w_hr);
  return rnnfast::call_forward(args, save_workspace);
}

// _C.layer(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, batch_first)
// -> (output, h_n, c_n): rnnfast::forward (forward_saving_as_needed), called through the
// dispatcher from C++.
// torch.ops' call from Python goes through the op's boxed form: at the small sizes recurrent
// layers often run at, that is a large share of the call (2 of the 7 us of a one-step layer's
// forward under no_grad). Arguments torch.ops would treat otherwise return NotImplemented: a
// tensor subclass (it may define __torch_function__), a torch function mode in force, anything but
// a tensor or None where a tensor goes, flags that are not bools. The caller then calls the op
// through torch.ops, which handles or refuses them.
PyObject* layer(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 12) {
    PyErr_Format(PyExc_TypeError, "rnnfast._C.layer takes 12 arguments, got %zd", nargs);
    return nullptr;
  }
  Py_ssize_t cell_size = 0;
  const char* cell =
      PyUnicode_Check(args[0]) ? PyUnicode_AsUTF8AndSize(args[0], &cell_size) : nullptr;
  if (cell == nullptr) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  bool plain =
      PyBool_Check(args[10]) && PyBool_Check(args[11]) && !at::impl::torch_function_mode_enabled();
  // input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths (args[1 .. 9]); input, w_ih and w_hh
  // are required.
  std::optional<Tensor> tensors[9];
  for (int i = 0; i < 9; ++i) tensors[i] = optional_tensor(args[1 + i], &plain);
  if (!plain || !tensors[0] || !tensors[3] || !tensors[4]) Py_RETURN_NOTIMPLEMENTED;
  const auto& [input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths] = tensors;
  const bool reverse = args[10] == Py_True, batch_first = args[11] == Py_True;
  std::tuple<Tensor, Tensor, Tensor, Tensor> results;
  {
    pybind11::gil_scoped_release no_gil;
    results = forward_saving_as_needed(
        rnnfast::LayerArgs::of(c10::string_view(cell, cell_size), *input, hx, cx, *w_ih, *w_hh,
                               b_ih, b_hh, w_hr, lengths, reverse, batch_first));
  }
  return tensor_tuple({std::move(std::get<0>(results)), std::move(std::get<1>(results)),
                       std::move(std::get<2>(results))});
  END_HANDLE_TH_ERRORS
}

// The cell named by a Python string, or nullptr where it is none of the engines' cells.
const rnnfast::CellName* cell_named(PyObject* name) {
  if (!PyUnicode_Check(name)) return nullptr;
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  for (const rnnfast::CellName& cell : rnnfast::kCellNames) {
    if (std::strcmp(cell.name, text) == 0) return &cell;
  }
  return nullptr;
}

// A state argument of plain_layers or single_step: an exact tensor of the expected sizes and of
// the input's dtype and device, or nullopt (with *plain set false) where it is anything else.
std::optional<Tensor> plain_state(PyObject* object, const Tensor& input, at::IntArrayRef expected,
                                  bool* plain) {
  if (!THPVariable_CheckExact(object)) {
    *plain = false;
    return std::nullopt;
  }
  const Tensor& state = THPVariable_Unpack(object);
  if (!state.sizes().equals(expected) || state.scalar_type() != input.scalar_type() ||
      state.device() != input.device()) {
    *plain = false;
    return std::nullopt;
  }
  return state;
}

// A module's stack (plain_layers, options_layers) as read from the first 11 arguments of those
// functions: (cell, input, hx, parameters, flat_names, flat_weights, input_size, batch_first,
// num_layers, dropout, training).
struct StackCall {
  const rnnfast::CellName* cell = nullptr;
  Tensor input;  // [T, B, I], or [B, T, I] with batch_first
  bool batch_first = false, training = false;
  int64_t num_layers = 0;
  double dropout = 0.0;
  // Per layer [w_ih, w_hh], then [b_ih, b_hh] where the module has biases, then w_hr where it
  // projects: per_layer tensors each.
  std::vector<Tensor> flat;
  Py_ssize_t per_layer = 0;
  bool has_bias = false, projects = false, is_lstm = false;
  std::optional<Tensor> hx, cx;  // [L, B, P] and [L, B, H], or nullopt: zero states

  const Tensor& weight(int64_t layer, Py_ssize_t index) const {
    return flat[layer * per_layer + index];
  }
  std::optional<Tensor> optional_weight(bool present, int64_t layer, Py_ssize_t index) const {
    return present ? std::optional<Tensor>(weight(layer, index)) : std::nullopt;
  }
  std::optional<Tensor> w_hr(int64_t layer) const {
    return optional_weight(projects, layer, per_layer - 1);
  }
  // Layer l's initial states, hx[l] and cx[l], as the Python forward takes them.
  std::optional<Tensor> h0(int64_t layer) const {
    return hx ? std::optional<Tensor>(hx->select(0, layer)) : std::nullopt;
  }
  std::optional<Tensor> c0(int64_t layer) const {
    return cx ? std::optional<Tensor>(cx->select(0, layer)) : std::nullopt;
  }
};

// Reads a stack's arguments into *call: false where the call is not the plain case of a
// batched tensor (an unbatched or empty input, a state that is not a tensor of the expected
// shape, dtype and device, a weight of another dtype or device than the input, a weight that a
// parametrization has replaced: parameters[name] is not flat_weights[i]), or where a check behind
// torch.nn's errors fails.
bool read_stack_call(PyObject* const* args, StackCall* call) {
  PyObject *input_object = args[1], *hx_object = args[2], *parameters = args[3], *names = args[4],
           *weights = args[5];
  call->cell = cell_named(args[0]);
  if (call->cell == nullptr || !THPVariable_CheckExact(input_object) || !PyDict_Check(parameters) ||
      !PyList_Check(names) || !PyList_Check(weights) || !PyLong_Check(args[6]) ||
      !PyBool_Check(args[7]) || !PyLong_Check(args[8]) || !PyFloat_Check(args[9]) ||
      !PyBool_Check(args[10]) || at::impl::torch_function_mode_enabled()) {
    return false;
  }
  call->num_layers = PyLong_AsLongLong(args[8]);
  call->dropout = PyFloat_AS_DOUBLE(args[9]);
  call->training = args[10] == Py_True;
  call->input = THPVariable_Unpack(input_object);
  call->batch_first = args[7] == Py_True;
  const Tensor& input = call->input;
  const int64_t input_size = PyLong_AsLongLong(args[6]);
  const Py_ssize_t count = PyList_GET_SIZE(weights);
  if (call->num_layers < 1 || count % call->num_layers != 0 || PyList_GET_SIZE(names) != count ||
      input.dim() != 3 || input.size(2) != input_size || input.numel() == 0) {
    return false;
  }
  call->per_layer = count / call->num_layers;
  if (call->per_layer < 2 || call->per_layer > 5) return false;
  call->flat.resize(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* weight = PyList_GET_ITEM(weights, i);
    PyObject* registered = PyDict_GetItemWithError(parameters, PyList_GET_ITEM(names, i));
    if (registered != weight || !THPVariable_CheckExact(weight)) return false;
    call->flat[i] = THPVariable_Unpack(weight);
    if (call->flat[i].scalar_type() != input.scalar_type() ||
        call->flat[i].device() != input.device()) {
      return false;
    }
  }
  call->has_bias = call->per_layer >= 4;
  call->projects = call->per_layer == 3 || call->per_layer == 5;
  call->is_lstm = rnnfast::has_cell_state(call->cell->kind);

  const int64_t batch = input.size(call->batch_first ? 0 : 1);
  const int64_t state_size = call->weight(0, 1).size(1);
  if (hx_object == Py_None) return true;
  bool plain = true;
  if (call->is_lstm) {
    const bool pair = (PyTuple_Check(hx_object) && PyTuple_GET_SIZE(hx_object) == 2) ||
                      (PyList_Check(hx_object) && PyList_GET_SIZE(hx_object) == 2);
    if (!pair) return false;
    PyObject* h_object = PySequence_Fast_GET_ITEM(hx_object, 0);
    PyObject* c_object = PySequence_Fast_GET_ITEM(hx_object, 1);
    call->hx = plain_state(h_object, input, {call->num_layers, batch, state_size}, &plain);
    const int64_t hidden_size = call->weight(0, 0).size(0) / 4;
    if (plain) {
      call->cx = plain_state(c_object, input, {call->num_layers, batch, hidden_size}, &plain);
    }
  } else {
    call->hx = plain_state(hx_object, input, {call->num_layers, batch, state_size}, &plain);
  }
  return plain;
}

// Runs a stack as the Python forward does (functional.stacked, stacked_with_options): each
// layer's op on the last one's output x (layer_forward(layer, x) -> (output, h_n, c_n)),
// torch.nn's dropout of each layer's output but the last in training (F.dropout's op), the
// states stacked. Returns [output, h_n [L, B, P], c_n [L, B, H] or undefined].
template <typename LayerForward>
std::vector<Tensor> run_stack(const StackCall& call, Tensor x, const LayerForward& layer_forward) {
  pybind11::gil_scoped_release no_gil;
  std::vector<Tensor> h_n(call.num_layers), c_n(call.is_lstm ? call.num_layers : 0);
  for (int64_t layer = 0; layer < call.num_layers; ++layer) {
    auto [output, h, c] = layer_forward(layer, x);
    h_n[layer] = std::move(h);
    if (call.is_lstm) c_n[layer] = std::move(c);
    x = call.dropout > 0 && call.training && layer + 1 < call.num_layers
            ? at::dropout(output, call.dropout, true)
            : std::move(output);
  }
  // (One layer: its state unsqueezed, as the Python forward's.)
  const auto stacked = [&](std::vector<Tensor>& states) {
    return call.num_layers == 1 ? states[0].unsqueeze(0) : at::stack(states);
  };
  return {std::move(x), stacked(h_n), call.is_lstm ? stacked(c_n) : Tensor()};
}

// _C.plain_layers(cell, input, hx, parameters, flat_names, flat_weights, input_size, batch_first,
//                 num_layers, dropout, training)
// -> (output, h_n, c_n or None): the forward of a one-direction module without cell options
// (rnnfast/modules.py) on a batched tensor, in torch.nn's layout (h_n [L, B, P]), as its Python
// forward computes it: the same ops on the same tensors (functional.stacked). The checks behind
// torch.nn's errors run here as comparisons (read_stack_call); where any fails, or the call is
// anything but the plain case, it returns NotImplemented and the Python forward, which raises
// torch.nn's errors, runs instead. At the small sizes of many models the Python forward's checks
// and calls cost a quarter of a training step (16 rows, 32 units, one step: 15-18 of 110 us; two
// layers of 66 steps of 50 GRU units, one row: 10 of 150 us of the forward).
PyObject* plain_layers(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 11) {
    PyErr_Format(PyExc_TypeError, "rnnfast._C.plain_layers takes 11 arguments, got %zd", nargs);
    return nullptr;
  }
  StackCall call;
  if (!read_stack_call(args, &call)) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  // The op takes a batch_first input as it is and returns a batch_first output.
  return tensor_tuple(run_stack(call, call.input, [&](int64_t layer, const Tensor& x) {
    auto [output, h, c, workspace] = forward_saving_as_needed(rnnfast::LayerArgs::of(
        call.cell->name, x, call.h0(layer), call.c0(layer), call.weight(layer, 0),
        call.weight(layer, 1), call.optional_weight(call.has_bias, layer, 2),
        call.optional_weight(call.has_bias, layer, 3), call.w_hr(layer), std::nullopt,
        /*reverse=*/false, call.batch_first));
    return std::make_tuple(std::move(output), std::move(h), std::move(c));
  }));
  END_HANDLE_TH_ERRORS
}

// A weight of a cell, parameters[name]: *weight its tensor, or nullopt for None (an absent
// bias) and, where absent_is_none, for a missing key (a cell option's parameter the module does
// not have); false where it is anything else (a parametrization or pruning has moved it).
bool cell_weight(PyObject* parameters, const char* name, std::optional<Tensor>* weight,
                 bool absent_is_none = false) {
  PyObject* value = PyDict_GetItemString(parameters, name);
  if (value == Py_None || (value == nullptr && absent_is_none)) return true;
  if (value == nullptr || !THPVariable_CheckExact(value)) return false;
  *weight = THPVariable_Unpack(value);
  return true;
}

// Whether a tensor carries a forward-mode AD tangent.
bool has_tangent(const std::optional<Tensor>& t) { return t && t->_fw_grad(/*level=*/0).defined(); }

// A cell's step (single_step, options_step) as read from the first 7 arguments of those
// functions: (cell, input, h, c, parameters, input_size, hidden_size).
struct CellCall {
  const rnnfast::CellName* cell = nullptr;
  Tensor input;  // [B, I]
  PyObject* parameters = nullptr;
  bool is_lstm = false;
  std::optional<Tensor> h, c;  // [B, H], or nullopt: zeros
};

// Reads a cell's step into *call: false where it is not the plain case of a batched tensor
// (an unbatched or empty input, a state that is not a tensor [B, H] of the input's dtype and
// device, an unknown cell) or where a check behind torch.nn's errors fails.
bool read_cell_call(PyObject* const* args, CellCall* call) {
  call->cell = cell_named(args[0]);
  call->parameters = args[4];
  if (call->cell == nullptr || !THPVariable_CheckExact(args[1]) ||
      !PyDict_Check(call->parameters) || !PyLong_Check(args[5]) || !PyLong_Check(args[6]) ||
      at::impl::torch_function_mode_enabled()) {
    return false;
  }
  call->input = THPVariable_Unpack(args[1]);
  const Tensor& input = call->input;
  const int64_t input_size = PyLong_AsLongLong(args[5]);
  const int64_t hidden_size = PyLong_AsLongLong(args[6]);
  if (input.dim() != 2 || input.size(1) != input_size || input.size(0) == 0 || hidden_size == 0) {
    return false;
  }
  call->is_lstm = rnnfast::has_cell_state(call->cell->kind);
  bool plain = true;
  // None, or a state [B, H].
  const auto state = [&](PyObject* object) -> std::optional<Tensor> {
    if (object == Py_None) return std::nullopt;
    return plain_state(object, input, {input.size(0), hidden_size}, &plain);
  };
  call->h = state(args[2]);
  if (call->is_lstm) call->c = state(args[3]);
  return plain;
}

// _C.single_step(cell, input, h, c, parameters, input_size, hidden_size) -> (h', c' or None):
// one step of a cell module without cell options (rnnfast/modules.py) on a batched input
// [B, I], states [B, H] or None, as its Python forward computes it (the one-layer op over a
// sequence of one step). As plain_layers, it returns NotImplemented where a check behind
// torch.nn's errors fails or the call is not the plain case (unbatched input, a weight that a
// parametrization or pruning computes, an unknown cell), and the Python forward runs.
PyObject* single_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_Format(PyExc_TypeError, "rnnfast._C.single_step takes 7 arguments, got %zd", nargs);
    return nullptr;
  }
  CellCall call;
  std::optional<Tensor> w_ih, w_hh, b_ih, b_hh;
  if (!read_cell_call(args, &call) || !cell_weight(call.parameters, "weight_ih", &w_ih) ||
      !cell_weight(call.parameters, "weight_hh", &w_hh) ||
      !cell_weight(call.parameters, "bias_ih", &b_ih) ||
      !cell_weight(call.parameters, "bias_hh", &b_hh) || !w_ih || !w_hh ||
      call.input.scalar_type() != w_ih->scalar_type() || call.input.device() != w_ih->device()) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  const Tensor& input = call.input;
  const rnnfast::CellName* cell = call.cell;
  const std::optional<Tensor>&h = call.h, &c = call.c;
  const bool is_lstm = call.is_lstm;
  Tensor h_new, c_new;
  {
    pybind11::gil_scoped_release no_gil;
    const Tensor sequence = input.unsqueeze(0);  // [1, B, I], as the Python forward's
    auto [output, h_n, c_n, workspace] = forward_saving_as_needed(
        rnnfast::LayerArgs::of(cell->name, sequence, h, c, *w_ih, *w_hh, b_ih, b_hh, std::nullopt,
                               std::nullopt, /*reverse=*/false, /*batch_first=*/false));
    h_new = std::move(h_n);
    if (is_lstm) c_new = std::move(c_n);
  }
  return tensor_tuple({std::move(h_new), std::move(c_new)});
  END_HANDLE_TH_ERRORS
}

// The op with cell options (rnnfast::forward_with_options) on a sequence [T, B, I] through the
// dispatcher, as functional.layer_with_options calls it with no masks: its autograd kernel makes
// the graph node where a gradient will be asked for. weights: w_ih, w_hh, b_ih, b_hh, then
// layer_norm's gains and the cell state's bias.
std::tuple<Tensor, Tensor, Tensor> forward_with_options_call(
    const char* cell, const Tensor& sequence, const std::optional<Tensor>& h,
    const std::optional<Tensor>& c, const std::optional<Tensor> (&weights)[8],
    const std::optional<Tensor>& w_hr, double zoneout, double zoneout_cell, bool save) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnnfast::forward_with_options", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                               Tensor, Tensor, Tensor, Tensor, Tensor>(
                                 c10::string_view, const Tensor&, const std::optional<Tensor>&,
                                 const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                 const std::optional<Tensor>&, const std::optional<Tensor>&,
                                 const std::optional<Tensor>&, const std::optional<Tensor>&,
                                 const std::optional<Tensor>&, const std::optional<Tensor>&,
                                 const std::optional<Tensor>&, const std::optional<Tensor>&,
                                 const std::optional<Tensor>&, const std::optional<Tensor>&, double,
                                 double, const std::optional<Tensor>&, bool, bool)>();
  const auto& [w_ih, w_hh, b_ih, b_hh, norm_ih, norm_hh, norm_cell_weight, norm_cell_bias] =
      weights;
  auto results = op.call(cell, sequence, h, c, *w_ih, *w_hh, b_ih, b_hh, w_hr, norm_ih, norm_hh,
                         norm_cell_weight, norm_cell_bias, std::nullopt, std::nullopt, std::nullopt,
                         zoneout, zoneout_cell, std::nullopt,
                         /*reverse=*/false, save);
  return {std::move(std::get<0>(results)), std::move(std::get<1>(results)),
          std::move(std::get<2>(results))};
}

// _C.options_step(cell, input, h, c, parameters, input_size, hidden_size, layer_norm, zoneout,
// zoneout_cell) -> (h', c' or None): one step of a cell module with cell options (layer_norm, or
// zoneout with no masks to draw: in evaluation its expectation) on a batched float or double
// input [B, I] on the CPU, states [B, H] or None, as its Python forward computes it
// (functional.layer_with_options over a sequence of one step). As single_step, it returns
// NotImplemented where a check behind torch.nn's errors fails or the call is not this case
// (unbatched input, another dtype or device, a weight that a parametrization computes, a
// forward-mode AD tangent), and the Python forward runs. The Python forward's checks and calls
// took about half of the step of 16 rows of 64 layer-normalised LSTM units (53 -> 29 us under
// no_grad, 2 threads of a Xeon).
PyObject* options_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10) {
    PyErr_Format(PyExc_TypeError, "rnnfast._C.options_step takes 10 arguments, got %zd", nargs);
    return nullptr;
  }
  CellCall call;
  if (!PyBool_Check(args[7]) || !PyFloat_Check(args[8]) || !PyFloat_Check(args[9]) ||
      !read_cell_call(args, &call)) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  const Tensor& input = call.input;
  const rnnfast::CellName* cell = call.cell;
  const std::optional<Tensor>&h = call.h, &c = call.c;
  const bool is_lstm = call.is_lstm;
  // weight_ih, weight_hh, bias_ih, bias_hh, then layer_norm's gains and the cell state's bias.
  constexpr const char* kNames[8] = {"weight_ih",
                                     "weight_hh",
                                     "bias_ih",
                                     "bias_hh",
                                     "layer_norm_ih_weight",
                                     "layer_norm_hh_weight",
                                     "layer_norm_cell_weight",
                                     "layer_norm_cell_bias"};
  std::optional<Tensor> weights[8];
  for (int i = 0; i < 8; ++i) {
    if (!cell_weight(call.parameters, kNames[i], &weights[i], /*absent_is_none=*/true)) {
      PyErr_Clear();
      Py_RETURN_NOTIMPLEMENTED;
    }
  }
  const bool layer_norm = args[7] == Py_True;
  const double zoneout = PyFloat_AsDouble(args[8]), zoneout_cell = PyFloat_AsDouble(args[9]);
  const bool floating = input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble;
  if (!weights[0] || !weights[1] || !floating || !input.is_cpu() || has_tangent(input) ||
      has_tangent(h) || has_tangent(c)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  for (const std::optional<Tensor>& weight : weights) {
    if (weight && (weight->scalar_type() != input.scalar_type() ||
                   weight->device() != input.device() || has_tangent(weight))) {
      Py_RETURN_NOTIMPLEMENTED;
    }
  }
  // layer_norm's gains where it is on (absent from the parameters where a parametrization or
  // pruning computes them), none where it is off.
  const bool gains_as_expected = layer_norm
                                     ? weights[4] && weights[5] && (!is_lstm || weights[6])
                                     : !weights[4] && !weights[5] && !weights[6] && !weights[7];
  if (!gains_as_expected) Py_RETURN_NOTIMPLEMENTED;
  // A gradient will be asked for (or a trace recorded, which always saves:
  // forward_saving_as_needed).
  const bool save = torch::jit::tracer::isTracing() ||
                    torch::autograd::compute_requires_grad(input, h, c, weights[0], weights[1],
                                                           weights[2], weights[3], weights[4],
                                                           weights[5], weights[6], weights[7]);
  Tensor h_new, c_new;
  {
    pybind11::gil_scoped_release no_gil;
    auto [output, h_n, c_n] = forward_with_options_call(
        cell->name, input.unsqueeze(0), h, c, weights, std::nullopt, zoneout, zoneout_cell, save);
    h_new = std::move(h_n);
    if (is_lstm) c_new = std::move(c_n);
  }
  return tensor_tuple({std::move(h_new), std::move(c_new)});
  END_HANDLE_TH_ERRORS
}

// _C.options_layers(cell, input, hx, parameters, flat_names, flat_weights, input_size,
//                   batch_first, num_layers, dropout, training, norm_names, zoneout, zoneout_cell)
// -> (output, h_n, c_n or None): the forward of a one-direction module with cell options that act
// in its time loop and draw no masks (layer_norm; zoneout in evaluation) on a batched float or
// double tensor on the CPU, as its Python forward computes it (functional.stacked_with_options:
// per layer the op with cell options on the time-major sequence, torch.nn's dropout between
// layers, the states stacked). norm_names: the module's layer_norm parameters, per layer its
// gains of x W_ih^T and h W_hh^T, then for the LSTM the cell state's gain and, with biases, its
// bias. As plain_layers, it returns NotImplemented where a check behind torch.nn's errors fails
// or the call is not this case (also: another dtype or device, a layer_norm parameter that a
// parametrization computes, a forward-mode AD tangent), and the Python forward runs. The Python
// forward's checks and calls took 15-20 us a call (2 threads of a Xeon, one step of 8
// layer-normalised LSTM units: 29.5 -> 13.7 us under no_grad, the plain layer's 8 us; its
// training step 109 -> 82 us).
PyObject* options_layers(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 14) {
    PyErr_Format(PyExc_TypeError, "rnnfast._C.options_layers takes 14 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject *parameters = args[3], *norm_names = args[11];
  StackCall call;
  if (!PyTuple_Check(norm_names) || !PyFloat_Check(args[12]) || !PyFloat_Check(args[13]) ||
      !read_stack_call(args, &call)) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  const double zoneout = PyFloat_AS_DOUBLE(args[12]), zoneout_cell = PyFloat_AS_DOUBLE(args[13]);
  const Tensor& input = call.input;
  const bool floating = input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble;
  // (Forward-mode AD: the Python forward raises the op's error.)
  if (!floating || !input.is_cpu() || has_tangent(input) || has_tangent(call.hx) ||
      has_tangent(call.cx)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  for (const Tensor& weight : call.flat) {
    if (has_tangent(weight)) Py_RETURN_NOTIMPLEMENTED;
  }
  // Per layer: norm_ih, norm_hh, norm_cell_weight, norm_cell_bias (nullopt where absent).
  const Py_ssize_t norm_count = PyTuple_GET_SIZE(norm_names);
  if (norm_count % call.num_layers != 0 || norm_count / call.num_layers > 4) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const Py_ssize_t norms_per_layer = norm_count / call.num_layers;
  std::vector<std::optional<Tensor>> norms(call.num_layers * 4);
  for (Py_ssize_t i = 0; i < norm_count; ++i) {
    PyObject* norm = PyDict_GetItemWithError(parameters, PyTuple_GET_ITEM(norm_names, i));
    if (norm == nullptr || !THPVariable_CheckExact(norm)) {
      PyErr_Clear();
      Py_RETURN_NOTIMPLEMENTED;
    }
    const Tensor& gain = THPVariable_Unpack(norm);
    if (gain.scalar_type() != input.scalar_type() || gain.device() != input.device() ||
        has_tangent(gain)) {
      Py_RETURN_NOTIMPLEMENTED;
    }
    norms[(i / norms_per_layer) * 4 + i % norms_per_layer] = gain;
  }
  // The op takes a time-major sequence: a batch_first input as a view [T, B, I], the output
  // made batch_first again as a view.
  const Tensor sequence = call.batch_first ? input.transpose(0, 1) : input;
  std::vector<Tensor> results = run_stack(call, sequence, [&](int64_t layer, const Tensor& x) {
    const std::optional<Tensor> weights[8] = {call.weight(layer, 0),
                                              call.weight(layer, 1),
                                              call.optional_weight(call.has_bias, layer, 2),
                                              call.optional_weight(call.has_bias, layer, 3),
                                              norms[layer * 4],
                                              norms[layer * 4 + 1],
                                              norms[layer * 4 + 2],
                                              norms[layer * 4 + 3]};
    const std::optional<Tensor> h0 = call.h0(layer), c0 = call.c0(layer), w_hr = call.w_hr(layer);
    // A gradient will be asked for (or a trace recorded, which always saves).
    const bool save = torch::jit::tracer::isTracing() ||
                      torch::autograd::compute_requires_grad(
                          x, h0, c0, weights[0], weights[1], weights[2], weights[3], w_hr,
                          weights[4], weights[5], weights[6], weights[7]);
    return forward_with_options_call(call.cell->name, x, h0, c0, weights, w_hr, zoneout,
                                     zoneout_cell, save);
  });
  if (call.batch_first) results[0] = results[0].transpose(0, 1);
  return tensor_tuple(std::move(results));
  END_HANDLE_TH_ERRORS
}

// _C.share_saved_output(output, replacement) -> bool: rnnfast::share_saved_output (layer.h).
PyObject* share_saved_output(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "rnnfast._C.share_saved_output takes two tensors");
    return nullptr;
  }
  if (rnnfast::share_saved_output(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]))) {
    Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

// _C.empty_cpu_cache(): gives the CPU engine's free buffers back to the system.
PyObject* empty_cpu_cache(PyObject* /*module*/, PyObject* /*args*/) {
  rnnfast::BufferPool::instance().empty_cache();
  Py_RETURN_NONE;
}

// _C.cpu_cache_info() -> (bytes, blocks) the CPU engine keeps free for reuse.
PyObject* cpu_cache_info(PyObject* /*module*/, PyObject* /*args*/) {
  rnnfast::BufferPool& pool = rnnfast::BufferPool::instance();
  return Py_BuildValue("(nn)", static_cast<Py_ssize_t>(pool.cached_bytes()),
                       static_cast<Py_ssize_t>(pool.cached_blocks()));
}

// _C.cpu_capability() -> the instruction set of the CPU engine's copy that runs here
// (cpu/capability.h).
PyObject* cpu_capability(PyObject* /*module*/, PyObject* /*args*/) {
  return PyUnicode_FromString(rnnfast::cpu::engine().capability);
}

// _C.cpu_amx() -> whether that copy runs bfloat16 layers' per-step products on AMX tiles here
// (cpu/amx_product.h; RNNFAST_CPU_AMX=0 turns them off).
PyObject* cpu_amx(PyObject* /*module*/, PyObject* /*args*/) {
  return PyBool_FromLong(rnnfast::cpu::engine().runs_amx());
}

// The mean time in nanoseconds for a value written by one of ATen's first two threads to reach
// the other and an answer to come back, over `round_trips` round trips; NaN where ATen runs
// fewer than two threads (or the two did not run at once within a second). On a cloud machine
// it shows where the two threads' cores sit: on a 2-vCPU AMD EPYC it moved between about
// 45-90 ns and 310-450 ns, for milliseconds to tens of seconds at a time, and at the far times
// every two-thread step that hands data from one thread to the other ran slower
// (benchmarks/README.md, "Run-to-run spread").
double thread_round_trip_ns(int64_t round_trips) {
  using Clock = std::chrono::steady_clock;
  if (at::get_num_threads() < 2 || at::in_parallel_region() || round_trips < 1) return NAN;
  // The ball: the last hit's number, odd ones from thread 0, even ones from thread 1.
  alignas(64) std::atomic<int64_t> ball{0};
  alignas(64) std::atomic<int> arrived{0};
  std::atomic<bool> gave_up{false};
  double nanoseconds = NAN;
  const auto deadline = Clock::now() + std::chrono::seconds(1);
  // Spins until `done` or the deadline (then it gives up, for both threads).
  const auto wait_for = [&](const auto& done) {
    for (int64_t spins = 0; !done(); ++spins) {
      if (gave_up.load(std::memory_order_relaxed)) return false;
      if (spins % 4096 == 4095 && Clock::now() > deadline) {
        gave_up.store(true);
        return false;
      }
    }
    return true;
  };
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    if (end - begin != 1) return;  // one thread ran both: nothing to measure
    const bool first = begin == 0;
    arrived.fetch_add(1);
    if (!wait_for([&] { return arrived.load() == 2; })) return;
    const auto start = Clock::now();
    for (int64_t hit = 1; hit <= 2 * round_trips; hit += 2) {
      const int64_t mine = first ? hit : hit + 1;  // thread 0 serves, thread 1 returns
      if (!wait_for([&] { return ball.load(std::memory_order_acquire) == mine - 1; })) return;
      ball.store(mine, std::memory_order_release);
    }
    if (first && wait_for([&] { return ball.load() == 2 * round_trips; })) {
      nanoseconds = std::chrono::duration<double, std::nano>(Clock::now() - start).count() /
                    static_cast<double>(round_trips);
    }
  });
  return gave_up.load() ? NAN : nanoseconds;
}

// _C.thread_round_trip_ns(round_trips) -> float: thread_round_trip_ns above (the benchmarks
// record it beside their timings).
PyObject* thread_round_trip(PyObject* /*module*/, PyObject* arg) {
  const long long round_trips = PyLong_AsLongLong(arg);
  if (round_trips == -1 && PyErr_Occurred()) return nullptr;
  double nanoseconds = NAN;
  {
    pybind11::gil_scoped_release released;  // the probe spins for up to a second
    nanoseconds = thread_round_trip_ns(round_trips);
  }
  return PyFloat_FromDouble(nanoseconds);
}

PyMethodDef module_methods[] = {
    {"layer", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(layer)), METH_FASTCALL,
     "rnnfast::forward for one layer from eager Python: (output, h_n, c_n), or NotImplemented for "
     "arguments only torch.ops handles."},
    {"plain_layers", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(plain_layers)),
     METH_FASTCALL,
     "The forward of a one-direction module without cell options in torch.nn's layout, or "
     "NotImplemented where the module's Python forward must run."},
    {"single_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(single_step)),
     METH_FASTCALL,
     "One step of a cell module, or NotImplemented where the module's Python forward must run."},
    {"options_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(options_step)),
     METH_FASTCALL,
     "One step of a cell module with cell options and no masks to draw, or NotImplemented where "
     "the module's Python forward must run."},
    {"options_layers", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(options_layers)),
     METH_FASTCALL,
     "The forward of a one-direction module with cell options that draw no masks in torch.nn's "
     "layout, or NotImplemented where the module's Python forward must run."},
    {"share_saved_output",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(share_saved_output)), METH_FASTCALL,
     "Makes the graph node of a layer's output save another tensor of the same values instead."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Frees the CPU engine's cached buffers."},
    {"cpu_cache_info", cpu_cache_info, METH_NOARGS,
     "(bytes, blocks) of free buffers the CPU engine keeps for reuse."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set of the CPU engine's copy that runs on this CPU."},
    {"cpu_amx", cpu_amx, METH_NOARGS,
     "Whether that copy runs bfloat16 layers' per-step products on AMX tiles here."},
    {"thread_round_trip_ns", thread_round_trip, METH_O,
     "Mean nanoseconds of a round trip of a value between ATen's first two threads (NaN with "
     "fewer than two)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Built as a Python extension module so that `import rnnfast._C` loads the op registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // cells: {name: {"gates": ..., "saved_per_unit": ..., "has_cell_state": ...}} (cells.h).
  PyObject* cells = PyDict_New();
  for (const rnnfast::CellName& cell : rnnfast::kCellNames) {
    PyObject* sizes = rnnfast::dispatch_cell(cell.kind, [](auto cell_type) {
      using Cell = decltype(cell_type);
      return Py_BuildValue("{s:i,s:i,s:O}", "gates", Cell::kGates, "saved_per_unit",
                           Cell::kSavedPerUnit, "has_cell_state",
                           Cell::kHasCellState ? Py_True : Py_False);
    });
    PyDict_SetItemString(cells, cell.name, sizes);
    Py_DECREF(sizes);
  }
  PyModule_AddObject(module, "cells", cells);
  // cpu_engines: the instruction sets the CPU engine was compiled for, narrowest first.
  const std::vector<const rnnfast::cpu::Engine*> engines = rnnfast::cpu::built_engines();
  PyObject* engine_names = PyTuple_New(static_cast<Py_ssize_t>(engines.size()));
  for (size_t i = 0; i < engines.size(); ++i) {
    PyTuple_SET_ITEM(engine_names, static_cast<Py_ssize_t>(i),
                     PyUnicode_FromString(engines[i]->capability));
  }
  PyModule_AddObject(module, "cpu_engines", engine_names);
#ifdef RNNFAST_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
