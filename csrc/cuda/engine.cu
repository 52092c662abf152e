// The CUDA engine: rnnfast::forward / rnnfast::backward for one layer in one direction on the
// GPU, with exactly the CPU engine's semantics and outputs (csrc/cpu/engine.h): the same
// workspace layout [T, B, W], masking for variable lengths, first-step rules and projection.
//
// Forward: xg = x W_ih^T + b for all steps in ONE GEMM (cuBLAS through ATen). Then, where W_hh
// and the state fit in one block's shared memory (and the layer does not project), the whole
// time loop is ONE sequence kernel (sequence_kernels.cuh: sequence_block); with
// RNNFAST_CUDA_PERSISTENT=1, ahead of it, one persistent kernel of many blocks wherever a block's
// slice of W_hh fits (persistent_kernels.cuh), and with RNNFAST_CUDA_WARP_KERNELS=1, ahead of
// all, one warp per batch row where every gate of a row fits a warp (warp_kernels.cuh);
// elsewhere, per step,
// the recurrent GEMM hg = h W_hh^T into a preallocated buffer and ONE fused pointwise kernel
// (the math of csrc/cells.h) that writes h, c, the output and the workspace. Backward: the
// reverse loop as one sequence kernel, or per step one fused kernel plus the recurrent GEMM;
// then the gradients of x, W_ih, W_hh, W_hr and the biases as single GEMMs / reductions over
// all steps. Everything runs on the current stream of the input's device; the time loops never
// wait for the device (the lengths are read on the device by the kernels).
//
// float16 / bfloat16 store in their own type and accumulate in float (LSTM's c state is kept
// in float, as on the CPU). Under torch.autocast("cuda") the forward runs in the autocast
// dtype, like torch.nn's RNNs (forward_autocast below).
//
// RNNFAST_CUDA_HOST_EMULATION (tests only, never set by setup.py): compiled by a C++ compiler
// with the kernels_<type>.cu files, the same host code registers itself for CPU tensors and the
// "kernels" run as host loops over the threads' bodies (run_on_host, launch.cuh).
// tests/test_cuda_compile.py builds it so to check this file's indexing and loops against the
// CPU engine on a machine without a GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../layer.h"
#include "host.h"
#include "launchers.cuh"

namespace rnnfast {
namespace {

using at::Tensor;

#ifndef RNNFAST_CUDA_HOST_EMULATION
constexpr c10::DeviceType kEngineDevice = c10::DeviceType::CUDA;
constexpr c10::DispatchKey kEngineAutocastKey = c10::DispatchKey::AutocastCUDA;

// What plan_sequence needs to know of the current device.
struct DeviceLimits {
  int64_t multiprocessors, max_shared_bytes;
};
DeviceLimits device_limits() {
  int device = 0, multiprocessors = 0, max_shared_bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return {multiprocessors, max_shared_bytes};
}
#else
constexpr c10::DeviceType kEngineDevice = c10::DeviceType::CPU;
constexpr c10::DispatchKey kEngineAutocastKey = c10::DispatchKey::AutocastCPU;

// An emulated device of 2 multiprocessors, so that the emulation's blocks hold several rows.
struct DeviceLimits {
  int64_t multiprocessors, max_shared_bytes;
};
DeviceLimits device_limits() { return {2, 227 * 1024}; }
#endif

// RNNFAST_SEQUENCE_KERNELS=0 makes the engine run every layer as the GEMM-per-step loop (to
// compare the two paths); by default a layer runs as one sequence kernel wherever it fits.
bool sequence_kernels_enabled() {
  const char* setting = std::getenv("RNNFAST_SEQUENCE_KERNELS");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// The sequence kernel's plan for a layer; an unusable one (run the GEMM-per-step loop) for a
// projecting layer, under RNNFAST_SEQUENCE_KERNELS=0, or where the layer does not fit.
template <typename Cell, typename T>
cuda::SequencePlan sequence_plan(bool backward, const LayerSizes& s, int64_t ws_cols) {
  if (s.has_projection || !sequence_kernels_enabled()) return {};
  const DeviceLimits limits = device_limits();
  return cuda::plan_sequence<Cell, T>(backward, s.batch, s.hidden_size, s.state_size, s.gate_size,
                                      ws_cols, limits.multiprocessors, limits.max_shared_bytes);
}

// RNNFAST_CUDA_PERSISTENT=1 runs every layer the persistent kernels can hold as one
// cooperative launch of many blocks (persistent_kernels.cuh), ahead of the sequence kernel and
// the GEMM-per-step loop. Off by default until those kernels have passed the CUDA tests on a GPU.
bool persistent_kernels_enabled() {
  const char* setting = std::getenv("RNNFAST_CUDA_PERSISTENT");
  return setting != nullptr && std::strcmp(setting, "1") == 0;
}

// RNNFAST_CUDA_WARP_KERNELS=1 runs every layer whose gates fit one warp's lanes as one warp per
// batch row (warp_kernels.cuh), ahead of every other path. Off by default until those kernels
// have passed the CUDA tests on a GPU.
bool warp_kernels_enabled() {
  const char* setting = std::getenv("RNNFAST_CUDA_WARP_KERNELS");
  return setting != nullptr && std::strcmp(setting, "1") == 0;
}

bool runs_warp_kernels(const LayerSizes& s) {
  return !s.has_projection && warp_kernels_enabled() &&
         cuda::warp_kernels_fit(s.batch, s.hidden_size, s.state_size, s.gate_size);
}

template <typename Cell, typename T>
cuda::PersistentPlan persistent_plan(bool backward, const LayerSizes& s) {
  if (s.has_projection || !persistent_kernels_enabled()) return {};
  const DeviceLimits limits = device_limits();
  return cuda::plan_persistent<Cell, T>(backward, s.batch, s.hidden_size, s.state_size, s.gate_size,
                                        limits.multiprocessors, limits.max_shared_bytes);
}

// The sizes part of a persistent kernel's arguments; `barrier` is a zeroed [2] int32 tensor on
// the device.
cuda::PersistentShape persistent_shape(const cuda::LoopShape& loop,
                                       const cuda::PersistentPlan& plan, Tensor& barrier) {
  cuda::PersistentShape shape{loop};
  shape.units_per_block = plan.units_per_block;
  shape.barrier = reinterpret_cast<unsigned int*>(barrier.data_ptr<int32_t>());
  return shape;
}

// The sizes of a layer's time loop, as the kernels that run all of it in one launch take them.
// ws_cols: the workspace's columns, 0 when none is written or read.
cuda::LoopShape loop_shape(const LayerSizes& s, int64_t ws_cols, bool reverse,
                           const Tensor& lengths) {
  cuda::LoopShape shape{};
  shape.B = s.batch;
  shape.H = s.hidden_size;
  shape.P = s.state_size;
  shape.G = s.gate_size;
  shape.W = ws_cols;
  shape.steps = s.steps;
  shape.reverse = reverse;
  shape.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  return shape;
}

// The sizes part of a sequence kernel's arguments.
cuda::SequenceShape sequence_shape(const cuda::LoopShape& loop, const cuda::SequencePlan& plan) {
  cuda::SequenceShape shape{loop};
  shape.rows_per_block = plan.rows_per_block;
  return shape;
}

template <typename Cell, typename scalar_t>
void run_forward(const LayerSizes& s, int64_t ws_cols, bool reverse, const Tensor& lengths,
                 const Tensor& xg, const Tensor& w_hh, const Tensor& b_hh_per_step,
                 const Tensor& w_hr, Tensor& h_state, Tensor& c_state, Tensor& output,
                 Tensor& workspace) {
  using T = KernelType<scalar_t>;
  using A = at::opmath_type<scalar_t>;
  static_assert(std::is_same<A, cuda::AccType<T>>::value, "accumulation types agree");
  const int64_t B = s.batch, H = s.hidden_size, P = s.state_size, G = s.gate_size;
  const bool projecting = w_hr.defined();
  const bool saving = workspace.dim() == 3;  // [T, B, W] when saving, [0] otherwise
  const cudaStream_t stream = current_stream();
  const T* xg_data = data_of<scalar_t>(xg);
  T* out_data = data_of<scalar_t>(output);
  T* ws_data = saving && ws_cols > 0 ? data_of<scalar_t>(workspace) : nullptr;
  // The time loop's sizes and data for the kernels that run all of it in one launch.
  const cuda::LoopShape loop = loop_shape(s, ws_data != nullptr ? ws_cols : 0, reverse, lengths);
  cuda::LoopForwardData<T> data{};
  data.xg = xg_data;
  data.w_hh = data_of<scalar_t>(w_hh);
  data.b_hh = b_hh_per_step.defined() ? data_of<scalar_t>(b_hh_per_step) : nullptr;
  data.h = data_of<scalar_t>(h_state);
  data.c = Cell::kHasCellState ? c_state.data_ptr<A>() : nullptr;
  data.out = out_data;
  data.ws = ws_data;

  if (runs_warp_kernels(s)) {
    cuda::launch_warp<Cell, T>(cuda::WarpForwardArgs<T>{loop, data}, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    return;
  }

  const cuda::PersistentPlan persistent = persistent_plan<Cell, T>(/*backward=*/false, s);
  if (persistent.usable) {
    Tensor barrier = at::zeros({2}, xg.options().dtype(at::kInt));
    Tensor h_spare = at::empty_like(h_state);
    Tensor hg = at::empty({B, G}, xg.options());
    cuda::PersistentForwardArgs<T> args{persistent_shape(loop, persistent, barrier), data};
    args.h_spare = data_of<scalar_t>(h_spare);
    args.hg = data_of<scalar_t>(hg);
    cuda::launch_persistent<Cell, T>(args, persistent, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    return;
  }

  const cuda::SequencePlan plan = sequence_plan<Cell, T>(/*backward=*/false, s, ws_cols);
  if (plan.usable) {
    cuda::launch_sequence<Cell, T>(cuda::SequenceForwardArgs<T>{sequence_shape(loop, plan), data},
                                   plan, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    return;
  }

  const auto options = xg.options();
  Tensor hg = at::empty({B, G}, options);
  Tensor h_unprojected = projecting ? at::zeros({B, H}, options) : Tensor();
  Tensor h_projected = projecting ? at::empty({B, P}, options) : Tensor();
  const Tensor w_hh_t = w_hh.t();
  const Tensor w_hr_t = projecting ? w_hr.t() : Tensor();

  cuda::ForwardStepArgs<T> args{};
  args.B = B;
  args.H = H;
  args.P = P;
  args.G = G;
  args.W = saving ? ws_cols : 0;
  args.steps = s.steps;
  args.reverse = reverse;
  args.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  args.hg = data_of<scalar_t>(hg);
  args.h = data_of<scalar_t>(h_state);
  args.c = Cell::kHasCellState ? c_state.data_ptr<A>() : nullptr;
  args.h_unprojected = projecting ? data_of<scalar_t>(h_unprojected) : nullptr;

  cuda::ProjectionCopyArgs<T> copy{};
  copy.B = B;
  copy.P = P;
  copy.steps = s.steps;
  copy.lengths = args.lengths;
  copy.h_projected = projecting ? data_of<scalar_t>(h_projected) : nullptr;
  copy.h = args.h;

  for (int64_t step = 0; step < s.steps; ++step) {
    const int64_t t = reverse ? s.steps - 1 - step : step;
    // hg = h W_hh^T (+ b_hh where it could not be folded into xg)
    if (b_hh_per_step.defined()) {
      at::addmm_out(hg, b_hh_per_step, h_state, w_hh_t);
    } else {
      at::mm_out(hg, h_state, w_hh_t);
    }
    args.t = t;
    args.xg = xg_data + t * B * G;
    args.out = out_data + t * B * P;
    args.ws = ws_data != nullptr ? ws_data + t * B * ws_cols : nullptr;
    cuda::launch_forward_step<Cell, T>(args, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    if (projecting) {
      // h = h_unprojected W_hr^T for the active rows; inactive rows keep their state.
      at::mm_out(h_projected, h_unprojected, w_hr_t);
      copy.t = t;
      copy.out = args.out;
      cuda::launch_projection_copy<T>(copy, stream);
      RNNFAST_KERNEL_LAUNCH_CHECK();
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cuda(
    c10::string_view cell, const Tensor& input_, const std::optional<Tensor>& hx_,
    const std::optional<Tensor>& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
    const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
    const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& lengths_, bool reverse,
    bool save_workspace, bool batch_first) {
  DeviceGuard device_guard;
  if (input_.is_cuda()) device_guard.set_device(input_.device());
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LayerArgs args = LayerArgs::of(cell, input_, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_,
                                       lengths_, reverse, batch_first)
                             .time_major();
  const ForwardInputs in = prepare_forward(args);
  const LayerSizes& s = in.sizes;
  const Tensor &input = in.input, &w_ih = in.w_ih, &w_hh = in.w_hh, &w_hr = in.w_hr;
  const Tensor& lengths = in.lengths;
  const int64_t ws_cols = workspace_width(s.kind, s.hidden_size, s.has_projection);

  ForwardState state = make_forward_state(s, args, save_workspace);
  Tensor &output = state.output, &h_state = state.h, &c_state = state.c;
  Tensor& workspace = state.workspace;

  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    // xg = x W_ih^T + b_ih (+ b_hh where the cell lets it fold in): [T * B, G], one GEMM.
    const Tensor x2d = input.view({s.steps * s.batch, s.input_size});
    Tensor xg, b_hh_per_step;
    if (args.b_ih.defined()) {
      const Tensor bias = Cell::kHiddenBiasFoldable ? (args.b_ih + args.b_hh) : args.b_ih;
      xg = at::addmm(bias, x2d, w_ih.t());
      if (!Cell::kHiddenBiasFoldable) b_hh_per_step = args.b_hh.contiguous();
    } else {
      xg = at::mm(x2d, w_ih.t());
    }
    xg = xg.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, input.scalar_type(), "rnnfast_forward_cuda", [&] {
          run_forward<Cell, scalar_t>(s, ws_cols, reverse, lengths, xg, w_hh, b_hh_per_step, w_hr,
                                      h_state, c_state, output, workspace);
        });
  });
  return {swap_time_and_batch(output, batch_first), h_state, final_cell_state(s, state, input),
          returned_workspace(s, workspace)};
}

template <typename Cell, typename scalar_t>
void run_backward(const LayerSizes& s, int64_t ws_cols, bool reverse, const Tensor& lengths,
                  const Tensor& grad_output, const Tensor& hx, const Tensor& cx, const Tensor& w_hh,
                  const Tensor& w_hr, const Tensor& output, const Tensor& workspace,
                  Tensor& dh_state, Tensor& dc_state, Tensor& dgate_x, Tensor& dgate_h,
                  Tensor& dprojected) {
  using T = KernelType<scalar_t>;
  using A = at::opmath_type<scalar_t>;
  static_assert(std::is_same<A, cuda::AccType<T>>::value, "accumulation types agree");
  const int64_t B = s.batch, H = s.hidden_size, P = s.state_size, G = s.gate_size;
  const bool projecting = w_hr.defined();
  const cudaStream_t stream = current_stream();

  // The time loop's sizes and data for the kernels that run all of it in one launch.
  const cuda::LoopShape loop = loop_shape(s, ws_cols, reverse, lengths);
  cuda::LoopBackwardData<T> data{};
  data.grad_output = data_of<scalar_t>(grad_output);
  data.hx = data_of<scalar_t>(hx);
  data.cx = Cell::kHasCellState ? data_of<scalar_t>(cx) : nullptr;
  data.output = data_of<scalar_t>(output);
  data.ws = ws_cols > 0 ? data_of<scalar_t>(workspace) : nullptr;
  data.w_hh = data_of<scalar_t>(w_hh);
  data.dh = data_of<scalar_t>(dh_state);
  data.dc = Cell::kHasCellState ? dc_state.data_ptr<A>() : nullptr;
  data.dgate_x = data_of<scalar_t>(dgate_x);
  data.dgate_h = data_of<scalar_t>(dgate_h);

  if (runs_warp_kernels(s)) {
    cuda::launch_warp<Cell, T>(cuda::WarpBackwardArgs<T>{loop, data}, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    return;
  }

  const cuda::PersistentPlan persistent = persistent_plan<Cell, T>(/*backward=*/true, s);
  if (persistent.usable) {
    Tensor barrier = at::zeros({2}, grad_output.options().dtype(at::kInt));
    Tensor dh_direct = at::empty({B, P}, grad_output.options());
    cuda::PersistentBackwardArgs<T> args{persistent_shape(loop, persistent, barrier), data};
    args.dh_direct = data_of<scalar_t>(dh_direct);
    cuda::launch_persistent<Cell, T>(args, persistent, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    return;
  }

  const cuda::SequencePlan plan = sequence_plan<Cell, T>(/*backward=*/true, s, ws_cols);
  if (plan.usable) {
    cuda::launch_sequence<Cell, T>(cuda::SequenceBackwardArgs<T>{sequence_shape(loop, plan), data},
                                   plan, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    return;
  }

  const auto options = grad_output.options();
  Tensor dh_direct = at::empty({B, P}, options);
  Tensor dh_unprojected = projecting ? at::empty({B, H}, options) : Tensor();
  const Tensor& dgate_recurrent = Cell::kSeparateHiddenGateGrad ? dgate_h : dgate_x;

  cuda::BackwardStepArgs<T> args{};
  args.B = B;
  args.H = H;
  args.P = P;
  args.G = G;
  args.W = ws_cols;
  args.steps = s.steps;
  args.reverse = reverse;
  args.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  args.dh = data_of<scalar_t>(dh_state);
  args.dc = Cell::kHasCellState ? dc_state.data_ptr<A>() : nullptr;
  args.hx = data_of<scalar_t>(hx);
  args.cx = Cell::kHasCellState ? data_of<scalar_t>(cx) : nullptr;
  const T* output_data = data_of<scalar_t>(output);
  const T* ws_data = ws_cols > 0 ? data_of<scalar_t>(workspace) : nullptr;
  args.dh_unprojected = projecting ? data_of<scalar_t>(dh_unprojected) : nullptr;
  args.dh_direct = data_of<scalar_t>(dh_direct);
  const T* go_data = data_of<scalar_t>(grad_output);
  T* dgx_data = data_of<scalar_t>(dgate_x);
  T* dgh_data = data_of<scalar_t>(dgate_h);

  cuda::ProjectionGradArgs<T> pgrad{};
  pgrad.B = B;
  pgrad.P = P;
  pgrad.steps = s.steps;
  pgrad.lengths = args.lengths;
  pgrad.dh = args.dh;
  T* dp_data = projecting ? data_of<scalar_t>(dprojected) : nullptr;

  for (int64_t step = s.steps - 1; step >= 0; --step) {
    const int64_t t = reverse ? s.steps - 1 - step : step;
    args.t = t;
    args.grad_output = go_data + t * B * P;
    args.output = output_data + t * B * P;
    args.ws = ws_data != nullptr ? ws_data + t * B * ws_cols : nullptr;
    const int64_t prev_t = reverse ? t + 1 : t - 1;  // the step before t in time order
    const bool has_prev = prev_t >= 0 && prev_t < s.steps;
    args.prev_output = has_prev ? output_data + prev_t * B * P : nullptr;
    args.prev_ws = has_prev && ws_data != nullptr ? ws_data + prev_t * B * ws_cols : nullptr;
    if (projecting) {
      // dLoss/dh (projected) of this step, then back through W_hr.
      pgrad.t = t;
      pgrad.grad_output = args.grad_output;
      pgrad.dprojected = dp_data + t * B * P;
      cuda::launch_projection_grad<T>(pgrad, stream);
      RNNFAST_KERNEL_LAUNCH_CHECK();
      at::mm_out(dh_unprojected, dprojected.select(0, t), w_hr);
    }
    args.dgate_x = dgx_data + t * B * G;
    args.dgate_h = dgh_data + t * B * G;
    cuda::launch_backward_step<Cell, T>(args, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    // dh_prev = dh_direct + dgate_h[t] W_hh
    at::addmm_out(dh_state, dh_direct, dgate_recurrent.select(0, t), w_hh);
  }
}

// The backward op on time-major tensors (registered as backward_op<backward_time_major>).
BackwardResult backward_time_major(const BackwardArgs& args) {
  const bool reverse = args.layer.reverse;
  DeviceGuard device_guard;
  if (args.layer.input.is_cuda()) device_guard.set_device(args.layer.input.device());
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const BackwardInputs in = prepare_backward(args);
  const LayerSizes& s = in.sizes;
  const Tensor &input = in.input, &hx = in.hx, &cx = in.cx, &w_ih = in.w_ih, &w_hh = in.w_hh;
  const Tensor &w_hr = in.w_hr, &lengths = in.lengths, &grad_output = in.grad_output;
  const Tensor &output = in.output, &workspace = in.workspace;
  // This engine's forward saves all T * B rows (prepare_backward gives them as [T, B, W]).
  TORCH_CHECK(workspace.dim() == 3,
              "rnnfast: the CUDA engine's backward needs the workspace of its own forward, with "
              "T * B = ",
              s.steps * s.batch, " rows; got ", args.workspace.sizes());
  const int64_t ws_cols = workspace_width(s.kind, s.hidden_size, s.has_projection);
  BackwardState state = make_backward_state(s, args);
  // The kernels read the initial states; zero ones are materialised for them.
  const auto options = input.options();
  const Tensor hx_or_zero = hx.defined() ? hx : at::zeros({s.batch, s.state_size}, options);
  const Tensor cx_or_zero =
      cx.defined() || !has_cell_state(s.kind) ? cx : at::zeros({s.batch, s.hidden_size}, options);
  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, input.scalar_type(), "rnnfast_backward_cuda", [&] {
          run_backward<Cell, scalar_t>(s, ws_cols, reverse, lengths, grad_output, hx_or_zero,
                                       cx_or_zero, w_hh, w_hr, output, workspace, state.dh,
                                       state.dc, state.dgate_x, state.dgate_h, state.dprojected);
        });
  });
  return finish_backward(s, state, input, hx, cx, w_ih, output, workspace, lengths, reverse,
                         args.has_bias, args.input_grad, kAtenGradientKernels);
}

// Autocast: under torch.autocast("cuda") torch.nn's RNNs run in the autocast dtype (float16 or
// bfloat16), and so does rnnfast::forward: its floating-point tensors on the device are cast
// to at::autocast::get_autocast_dtype (float64 ones are left alone, as autocast does; lengths
// are int64), then the op runs with autocast off. The casts are recorded by autograd, so the
// gradients reach float32 parameters in float32. The backward op needs no rule: it receives
// the forward's dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_autocast(
    c10::string_view cell, const Tensor& input, const std::optional<Tensor>& hx,
    const std::optional<Tensor>& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& lengths, bool reverse,
    bool save_workspace, bool batch_first) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(kEngineAutocastKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kEngineDevice);
  const auto cast = [dtype](const auto& t) {
    return at::autocast::cached_cast(dtype, t, kEngineDevice);
  };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnnfast::forward", "")
                             .typed<decltype(forward_cuda)>();
  return op.call(cell, cast(input), cast(hx), cast(cx), cast(w_ih), cast(w_hh), cast(b_ih),
                 cast(b_hh), cast(w_hr), lengths, reverse, save_workspace, batch_first);
}

}  // namespace
}  // namespace rnnfast

#ifndef RNNFAST_CUDA_HOST_EMULATION
TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  m.impl("forward", &rnnfast::forward_cuda);
  m.impl("backward", &rnnfast::backward_op<rnnfast::backward_time_major>);
}

TORCH_LIBRARY_IMPL(rnnfast, AutocastCUDA, m) { m.impl("forward", &rnnfast::forward_autocast); }
#else
TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("forward", &rnnfast::forward_cuda);
  m.impl("backward", &rnnfast::backward_op<rnnfast::backward_time_major>);
}

TORCH_LIBRARY_IMPL(rnnfast, AutocastCPU, m) { m.impl("forward", &rnnfast::forward_autocast); }
#endif
