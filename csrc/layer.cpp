// The device-independent parts of a layer's passes (ATen operations, and a row copy for CPU
// inputs), shared by the CPU and CUDA engines: the buffers of the forward and the reverse loop,
// and the gradients computed after the reverse loop.
#include "layer.h"

#include <ATen/Dispatch.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "buffer_pool.h"
#include "parallel_rows.h"

namespace rnnfast {

at::Tensor contiguous_or_undefined(const at::Tensor& t) {
  return t.defined() ? t.contiguous() : at::Tensor();
}

at::Tensor time_major_contiguous(const at::Tensor& input) {
  // Called up to three times per training step, the last two on its own earlier result.
  // is_contiguous_or_false: on symbolic sizes (a traced call) it decides without a guard,
  // where is_contiguous() would specialise the trace to the sizes it was traced with.
  if (input.is_contiguous_or_false()) return input;
  // Only a plain CPU tensor has data to copy by hand (not a fake or functional one, which
  // torch.compile traces with).
  const bool plain_cpu = input.device().is_cpu() &&
                         !input.unsafeGetTensorImpl()->is_python_dispatch() &&
                         !at::functionalization::impl::isFunctionalTensor(input);
  // Anything else (and any input the op's checks will refuse) takes ATen's copy.
  if (!plain_cpu || input.dim() != 3 || !at::isFloatingType(input.scalar_type()) ||
      !input.transpose(0, 1).is_contiguous()) {
    return input.contiguous();
  }
  const int64_t T_ = input.size(0), B = input.size(1), I = input.size(2);
  at::Tensor out = pooled_empty({T_, B, I}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "rnnfast_time_major", [&] {
        const scalar_t* from = input.data_ptr<scalar_t>();  // [B, T, I]
        scalar_t* to = out.data_ptr<scalar_t>();            // [T, B, I]
        // Batch rows (T * I values each) split over the threads.
        for_rows_in_copy_shares(B, T_ * I, [&](int64_t b_begin, int64_t b_end) {
          for (int64_t b = b_begin; b < b_end; ++b) {
            for (int64_t t = 0; t < T_; ++t) {
              // An element loop: a row is often a few values, too short for a memcpy call.
              const scalar_t* row = from + (b * T_ + t) * I;
              scalar_t* dst = to + (t * B + b) * I;
              for (int64_t i = 0; i < I; ++i) dst[i] = row[i];
            }
          }
        });
      });
  return out;
}

ForwardInputs prepare_forward(const LayerArgs& args, ReadsInputAtStrides reads_input_at_strides) {
  ForwardInputs in;
  in.sizes = check_layer_args(args);
  in.input = reads_input_at_strides && reads_input_at_strides(in.sizes, args.input)
                 ? args.input
                 : time_major_contiguous(args.input);
  in.w_ih = args.w_ih.contiguous();
  in.w_hh = args.w_hh.contiguous();
  in.w_hr = contiguous_or_undefined(args.w_hr);
  in.lengths = contiguous_or_undefined(args.lengths);
  return in;
}

namespace {
// Up to this many values a contiguous copy costs less time than the views that avoid it, and
// little memory.
constexpr int64_t kCopyRowsMaxValues = 1 << 12;
}  // namespace

// As it comes where x has contiguous rows already; else a small x contiguous; else where x is
// broadcast over steps or rows (stride 0), materialised once along the other dims and
// broadcast again; else a contiguous copy.
at::Tensor with_contiguous_rows(const at::Tensor& x) {
  if (x.size(2) <= 1 || x.stride(2) == 1) return x;
  if (x.numel() <= kCopyRowsMaxValues) return x.contiguous();
  at::Tensor base = x;
  for (int64_t dim = 0; dim < 2; ++dim) {
    if (x.stride(dim) == 0) base = base.narrow(dim, 0, 1);
  }
  return base.contiguous().expand(x.sizes());
}

BackwardInputs prepare_backward(const BackwardArgs& args, bool contiguous_grad_output,
                                ReadsInputAtStrides reads_input_at_strides,
                                bool strided_output_rows) {
  const LayerArgs& layer = args.layer;
  BackwardInputs in;
  in.sizes = check_layer_args(layer);
  check_backward_args(in.sizes, args);
  in.input = reads_input_at_strides && reads_input_at_strides(in.sizes, layer.input)
                 ? layer.input
                 : time_major_contiguous(layer.input);
  in.hx = contiguous_or_undefined(layer.hx);
  in.cx = contiguous_or_undefined(layer.cx);
  in.w_ih = layer.w_ih.contiguous();
  in.w_hh = layer.w_hh.contiguous();
  in.w_hr = contiguous_or_undefined(layer.w_hr);
  in.lengths = contiguous_or_undefined(layer.lengths);
  in.grad_output = contiguous_grad_output ? args.grad_output.contiguous() : args.grad_output;
  in.output = strided_output_rows && strided_rows_stride(args.output) > 0
                  ? args.output
                  : args.output.contiguous();
  // A padded workspace returned 2-D (returned_workspace) as the engines index it; a packed
  // one as it is.
  const LayerSizes& s = in.sizes;
  const at::Tensor& workspace = args.workspace;
  in.workspace = s.has_lengths && workspace.dim() == 2 && workspace.size(0) == s.steps * s.batch
                     ? workspace.contiguous().view({s.steps, s.batch, workspace.size(1)})
                     : workspace.contiguous();
  return in;
}

namespace {
// The storage handed over to the calling thread's backward op (WorkspaceHandover), or null.
thread_local const void* handed_over_storage = nullptr;
}  // namespace

WorkspaceHandover::WorkspaceHandover(const at::Tensor& workspace) : previous_(handed_over_storage) {
  handed_over_storage = workspace.storage().data();
}

WorkspaceHandover::~WorkspaceHandover() { handed_over_storage = previous_; }

bool WorkspaceHandover::covers(const at::Tensor& workspace) {
  return handed_over_storage != nullptr && workspace.numel() > 0 &&
         workspace.storage().data() == handed_over_storage;
}

ForwardState make_forward_state(const LayerSizes& s, const LayerArgs& args, bool save_workspace,
                                int64_t packed_rows) {
  const at::Tensor &hx = args.hx, &cx = args.cx;
  const auto options = args.input.options();
  const auto acc_type = at::toOpMathType(args.input.scalar_type());
  ForwardState state;
  state.output = pooled_empty({s.steps, s.batch, s.state_size}, options);
  state.h = s.has_initial_state ? hx.contiguous().clone()
                                : zeros_by_memset({s.batch, s.state_size}, options);
  if (!has_cell_state(s.kind)) {
    state.c = at::empty({0}, options.dtype(acc_type));
  } else if (s.has_initial_state) {
    state.c = cx.to(acc_type).contiguous().clone();
  } else {
    state.c = zeros_by_memset({s.batch, s.hidden_size}, options.dtype(acc_type));
  }
  const int64_t cols = workspace_width(s.kind, s.hidden_size, s.has_projection);
  if (!save_workspace) {
    state.workspace = at::empty({0}, options);
  } else if (packed_rows > 0 && packed_rows < s.steps * s.batch) {
    state.workspace = pooled_empty({packed_rows, cols}, options);
  } else {
    state.workspace = pooled_empty({s.steps, s.batch, cols}, options);
  }
  return state;
}

at::Tensor returned_workspace(const LayerSizes& s, const at::Tensor& workspace) {
  return s.has_lengths && workspace.dim() == 3 ? workspace.view({s.steps * s.batch, -1})
                                               : workspace;
}

at::Tensor final_cell_state(const LayerSizes& s, const ForwardState& state,
                            const at::Tensor& input) {
  return has_cell_state(s.kind) ? state.c.to(input.scalar_type()) : at::empty({0}, input.options());
}

std::pair<at::Tensor, at::Tensor> final_state_gradients(const LayerSizes& s,
                                                        const BackwardArgs& args) {
  const auto options = args.layer.input.options();
  const auto acc_type = at::toOpMathType(args.layer.input.scalar_type());
  at::Tensor dh = args.grad_h_n.defined() ? args.grad_h_n.contiguous().clone()
                                          : zeros_by_memset({s.batch, s.state_size}, options);
  at::Tensor dc;
  if (has_cell_state(s.kind)) {
    dc = args.grad_c_n.defined()
             ? args.grad_c_n.to(acc_type).contiguous().clone()
             : zeros_by_memset({s.batch, s.hidden_size}, options.dtype(acc_type));
  }
  return {dh, dc};
}

BackwardState make_backward_state(const LayerSizes& s, const BackwardArgs& args,
                                  const at::Tensor& dgate_x_buffer, bool last_hidden_gate_only,
                                  const at::Tensor& dgate_h_buffer) {
  const auto options = args.layer.input.options();
  BackwardState state;
  std::tie(state.dh, state.dc) = final_state_gradients(s, args);
  state.separate_hidden_gate_grad =
      dispatch_cell(s.kind, [](auto cell) { return decltype(cell)::kSeparateHiddenGateGrad; });
  state.dgate_x = dgate_x_buffer.defined() ? dgate_x_buffer
                                           : pooled_empty({s.steps, s.batch, s.gate_size}, options);
  const int64_t hidden_gate_cols = last_hidden_gate_only ? s.hidden_size : s.gate_size;
  state.dgate_h = !state.separate_hidden_gate_grad ? state.dgate_x
                  : dgate_h_buffer.defined()
                      ? dgate_h_buffer
                      : pooled_empty({s.steps, s.batch, hidden_gate_cols}, options);
  if (s.has_projection) {
    state.dprojected = pooled_empty({s.steps, s.batch, s.state_size}, options);
  }
  return state;
}

namespace {

void aten_matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void aten_column_sum(at::Tensor& out, const at::Tensor& x) { at::sum_out(out, x, 0); }

}  // namespace

const GradientKernels kAtenGradientKernels{&aten_matmul, &aten_column_sum};

at::Tensor GradientKernels::product(const at::Tensor& a, const at::Tensor& b) const {
  at::Tensor out = pooled_empty({a.size(0), b.size(1)}, a.options());
  matmul(out, a, b, /*accumulate=*/false);
  return out;
}

at::Tensor GradientKernels::column_sums(const at::Tensor& x) const {
  at::Tensor out = at::empty({x.size(1)}, x.options());
  column_sum(out, x);
  return out;
}

namespace {

// Whether any of `count` floating-point values, as their bits, has every exponent bit set (NaN
// and Inf alone do): an OR of per-value tests, an integer reduction that the compiler vectorizes.
template <typename Bits>
bool any_exponent_all_ones(const void* values, int64_t count, Bits exponent) {
  const Bits* bits = static_cast<const Bits*>(values);
  Bits non_finite = 0;
  for (int64_t i = 0; i < count; ++i) non_finite |= Bits((bits[i] & exponent) == exponent);
  return non_finite != 0;
}

// Whether gate gradients (contiguous rows) may hold a NaN or Inf: a scan of a CPU tensor's
// exponent bits, in every floating type (at::isfinite, taken for all but float, made four
// temporaries of the gradients' size: see run_forward's product of no terms); any other
// device's are taken as maybe (a check there would wait for the device).
bool may_be_non_finite(const at::Tensor& dgate) {
  if (!dgate.device().is_cpu()) return true;
  const at::Tensor values = dgate.contiguous();
  const void* data = values.data_ptr();
  const int64_t n = values.numel();
  switch (values.scalar_type()) {
    case at::kFloat: return any_exponent_all_ones<uint32_t>(data, n, 0x7f800000u);
    case at::kDouble: return any_exponent_all_ones<uint64_t>(data, n, 0x7ff0000000000000u);
    case at::kBFloat16: return any_exponent_all_ones<uint16_t>(data, n, 0x7f80u);
    case at::kHalf: return any_exponent_all_ones<uint16_t>(data, n, 0x7c00u);
    default: TORCH_INTERNAL_ASSERT(false, "rnnfast: gate gradients of ", values.scalar_type());
  }
}

// Rows [first, first + count) of [T * B] that one product takes; rows [first + count, end) after
// them are padding that no step reads.
struct RowGroup {
  int64_t first, count, end;
};

// For a packed sequence's input products (the input's gradient and W_ih's, over the rows of all
// steps) on the CPU: groups of consecutive steps whose rows run as one product, padding rows
// (after a row's last step, where the gate gradients are zero) at most an eighth of a group's
// rows, and a group's trailing padding left out. Empty where every row is active, or the rows
// do not go by length (active rows a prefix of each step's). The chatbot encoder's sentences of
// 3-10 words of 10 leave a third of the rows padding.
std::vector<RowGroup> active_row_groups(const at::Tensor& lengths, int64_t T_, int64_t B) {
  if (!lengths.defined() || !lengths.is_cpu() || B == 0) return {};
  const int64_t* length = lengths.data_ptr<int64_t>();
  if (!std::is_sorted(length, length + B, std::greater<int64_t>())) return {};
  // active[t]: rows of step t with a length past t
  std::vector<int64_t> active(T_);
  int64_t active_rows = 0;
  for (int64_t t = 0; t < T_; ++t) {
    active[t] = std::lower_bound(length, length + B, t, std::greater<int64_t>()) - length;
    active_rows += active[t];
  }
  if (8 * active_rows > 7 * T_ * B) return {};
  std::vector<RowGroup> groups;
  for (int64_t begin = 0; begin < T_;) {
    int64_t end = begin + 1, padding = 0;
    while (end < T_) {
      // Taking step `end` too pads the group with the inactive rows of step end - 1.
      const int64_t more_padding = padding + B - active[end - 1];
      const int64_t rows = (end - begin) * B + active[end];
      if (8 * more_padding > rows) break;
      padding = more_padding;
      ++end;
    }
    groups.push_back({begin * B, (end - 1 - begin) * B + active[end - 1], end * B});
    begin = end;
  }
  return groups;
}

}  // namespace

int64_t shared_hidden_gate_cols(const BackwardState& state, int64_t gate_size) {
  // dLoss/dhg: dgate_h where it holds all gates; where it holds the last gate only, the gates
  // before it are dgate_x's columns [0, G - Gh) (Gh: dgate_h's columns).
  return state.separate_hidden_gate_grad ? gate_size - state.dgate_h.size(-1) : gate_size;
}

at::Tensor hidden_bias_gradient(const BackwardState& state, const at::Tensor& grad_b_ih,
                                bool has_bias, const GradientKernels& kernels) {
  if (!has_bias) return at::empty({0}, grad_b_ih.options());
  const int64_t G = grad_b_ih.size(0), Gh = state.dgate_h.size(-1);
  const int64_t shared_cols = shared_hidden_gate_cols(state, G);
  at::Tensor grad_b_hh = grad_b_ih.clone();
  if (shared_cols < G) {
    at::Tensor last = Gh == G ? grad_b_hh : grad_b_hh.narrow(0, shared_cols, Gh);
    kernels.column_sum(last, state.dgate_h.reshape({-1, Gh}));
  }
  return grad_b_hh;
}

BackwardResult finish_backward(const LayerSizes& s, BackwardState& state, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                               const at::Tensor& output, const at::Tensor& workspace,
                               const at::Tensor& lengths, bool reverse, bool has_bias,
                               bool input_grad, const GradientKernels& kernels) {
  using at::Tensor;
  const int64_t T_ = s.steps, B = s.batch, G = s.gate_size, P = s.state_size, H = s.hidden_size;
  const auto options = input.options();
  // The running state gradients are the gradients of hx and cx now; without those, their
  // memory goes before the weight gradients are allocated.
  if (!hx.defined()) state.dh = Tensor();
  if (!cx.defined()) state.dc = Tensor();
  const Tensor dgx2d = state.dgate_x.view({T_ * B, G});
  Tensor grad_input, grad_w_ih;
  const std::vector<RowGroup> groups = input.is_cpu() && input.is_contiguous()
                                           ? active_row_groups(lengths, T_, B)
                                           : std::vector<RowGroup>();
  if (!groups.empty()) {
    const Tensor input2d = input.view({T_ * B, s.input_size});
    grad_input =
        input_grad ? pooled_empty({T_ * B, s.input_size}, options) : at::empty({0}, options);
    grad_w_ih = pooled_empty({G, s.input_size}, options);
    grad_w_ih.zero_();
    for (const RowGroup& group : groups) {
      if (group.count > 0) {
        kernels.matmul(grad_w_ih, dgx2d.narrow(0, group.first, group.count).t(),
                       input2d.narrow(0, group.first, group.count), /*accumulate=*/true);
      }
      if (!input_grad) continue;
      if (group.count > 0) {
        Tensor rows = grad_input.narrow(0, group.first, group.count);
        kernels.matmul(rows, dgx2d.narrow(0, group.first, group.count), w_ih,
                       /*accumulate=*/false);
      }
      const int64_t padded = group.first + group.count;
      grad_input.narrow(0, padded, group.end - padded).zero_();
    }
    if (input_grad) grad_input = grad_input.view({T_, B, s.input_size});
  } else if (input.is_contiguous()) {
    grad_input = input_grad ? kernels.product(dgx2d, w_ih).view({T_, B, s.input_size})
                            : at::empty({0}, options);
    grad_w_ih = kernels.product(dgx2d.t(), input.view({T_ * B, s.input_size}));
  } else {
    TORCH_INTERNAL_ASSERT(input.transpose(0, 1).is_contiguous());
    // An input [T, B, I] the engine takes batch-major (a batch_first tensor's transposed
    // view): a GEMM per batch row on its rows [T, I] and those of the time-major dgate_x
    // ([T, G] at a stride of B rows); the input's gradient comes back batch-major, as a
    // [T, B, I] view.
    if (input_grad) {
      Tensor batch_major = pooled_empty({B, T_, s.input_size}, options);
      for (int64_t b = 0; b < B; ++b) {
        Tensor rows = batch_major[b];
        kernels.matmul(rows, state.dgate_x.select(1, b), w_ih, /*accumulate=*/false);
      }
      grad_input = batch_major.transpose(0, 1);
    } else {
      grad_input = at::empty({0}, options);
    }
    grad_w_ih = pooled_empty({G, s.input_size}, options);
    for (int64_t b = 0; b < B; ++b) {
      kernels.matmul(grad_w_ih, state.dgate_x.select(1, b).t(), input.select(1, b),
                     /*accumulate=*/b > 0);
    }
  }
  const int64_t shared_cols = shared_hidden_gate_cols(state, G);

  // grad_w_hh = sum_t dgate_h[t]^T h_prev[t]. h_prev is the output of the previous step
  // (zero where that step was inactive, matching a zero gate gradient), except at each row's
  // first step, where it is hx: one GEMM over the shifted outputs plus one for the first steps
  // (none from zero initial states). Rows [row0, row0 + count) of it come from the first
  // `count` columns of dgate ([T, B, cols]).
  Tensor grad_w_hh = pooled_empty({G, P}, options);
  // h_prev of the steps after each row's first [(T - 1) * B, P]
  const Tensor prev_out =
      T_ > 1 ? (reverse ? output.narrow(0, 1, T_ - 1) : output.narrow(0, 0, T_ - 1))
                   .reshape({(T_ - 1) * B, P})
             : Tensor();
  const auto hidden_weight_rows = [&](const Tensor& dgate, int64_t row0, int64_t count) {
    const int64_t cols = dgate.size(2);
    Tensor out = count == G ? grad_w_hh : grad_w_hh.narrow(0, row0, count);
    bool written = false;
    if (T_ > 1) {
      const auto later = reverse ? dgate.narrow(0, 0, T_ - 1) : dgate.narrow(0, 1, T_ - 1);
      const Tensor later_rows = later.reshape({(T_ - 1) * B, cols});
      kernels.matmul(out, (count == cols ? later_rows : later_rows.narrow(1, 0, count)).t(),
                     prev_out, /*accumulate=*/false);
      written = true;
    }
    // Without hx, the first steps' term is dgate^T 0: run only where it is not zero. (The
    // first steps of a reversed packed sequence are scattered: all of dgate is checked.)
    const bool first_term_non_zero = !hx.defined() && T_ > 0 &&
                                     may_be_non_finite(!reverse             ? dgate[0]
                                                       : !lengths.defined() ? dgate[T_ - 1]
                                                                            : dgate);
    if (T_ > 0 && (hx.defined() || first_term_non_zero)) {
      Tensor first_dgate;
      if (!reverse) {
        first_dgate = dgate[0];
      } else if (!lengths.defined()) {
        first_dgate = dgate[T_ - 1];
      } else {
        // Row b starts at t = len[b] - 1; rows of length 0 never run.
        const Tensor first_rows =
            lengths.sub(1).clamp_min(0).mul(B).add(at::arange(B, lengths.options()));
        first_dgate = dgate.view({T_ * B, cols}).index_select(0, first_rows);
        first_dgate = first_dgate.mul(lengths.gt(0).unsqueeze(1).to(first_dgate.scalar_type()));
      }
      const Tensor first_rows = count == cols ? first_dgate : first_dgate.narrow(1, 0, count);
      if (hx.defined()) {
        kernels.matmul(out, first_rows.t(), hx, /*accumulate=*/written);
      } else {
        // From zero states the term dgate^T 0 is 0 where a row's gate gradients are finite,
        // and NaN where one is not (0 * NaN, 0 * Inf), as torch.nn's product makes it.
        if (!written) out.zero_();
        out.add_(first_rows.mul(0).sum(0).unsqueeze(1));
      }
      written = true;
    }
    if (!written) out.zero_();
  };
  if (shared_cols > 0) hidden_weight_rows(state.dgate_x, 0, shared_cols);
  if (shared_cols < G) hidden_weight_rows(state.dgate_h, shared_cols, G - shared_cols);
  Tensor grad_w_hr = at::empty({0}, options);
  if (s.has_projection) {
    // The unprojected h of every step is the workspace's last H columns.
    const int64_t cols = workspace.size(2);
    const Tensor h_unprojected = workspace.view({T_ * B, cols}).narrow(1, cols - H, H);
    grad_w_hr = kernels.product(state.dprojected.view({T_ * B, P}).t(), h_unprojected);
  }
  // The bias gradients last: they are not yet held while the weight gradients' products run,
  // whose buffers (ATen's GEMM of bfloat16 makes one of its own) are the backward's peak.
  Tensor grad_b_ih = !has_bias ? at::empty({0}, options)
                     : state.dgate_x_column_sums.defined()
                         ? state.dgate_x_column_sums.sum(0).to(input.scalar_type())
                         : kernels.column_sums(dgx2d);
  Tensor grad_b_hh = hidden_bias_gradient(state, grad_b_ih, has_bias, kernels);
  Tensor grad_hx = hx.defined() ? state.dh : at::empty({0}, options);
  Tensor grad_cx = cx.defined() ? state.dc.to(input.scalar_type()) : at::empty({0}, options);
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
}

}  // namespace rnnfast
