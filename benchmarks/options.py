#!/usr/bin/env python
"""The cell options (layer_norm, zoneout, recurrent_dropout, input_dropout) on the CPU: what
each costs over the plain fused layer, and how much faster it is than the same model written as
a Python loop of torch.nn cells plus torch.nn.LayerNorm / dropout.

    python benchmarks/options.py --threads 2 [--json out.json] [--filter LSTM/layer_norm]

Per row, in one process and interleaved (bench_lib.measure_pair), a training step (forward,
output.sum().backward()) of three models with the same weights:
  plain   rnnfast's layer without the option,
  option  rnnfast's layer with it,
  loop    the Python loop (the model a user writes without rnnfast).
It reports option / plain (the cost; target <= 1.3) and loop / option (the speed-up; target
>= 5). The loop's results are checked against the option's first (same masks, float64 for
the check), so both sides compute the same model.

It also reports each row's ceiling: the loop's time over the time the step's products alone
take at this machine's float32 GEMM rate (a 2048^3 torch.mm on the same threads), the speed-up
a fused layer that ran its products at that rate and did nothing else would have.
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bench_lib  # noqa: E402
import rnnfast  # noqa: E402
from rnnfast import functional  # noqa: E402

# (name, batch, steps, hidden): input size = hidden.
SHAPES = [("B16-T100-H64", 16, 100, 64), ("B16-T100-H256", 16, 100, 256),
          ("wordlm-B20-T35-H200", 20, 35, 200)]
FEATURES = {
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=0.1),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "input_dropout": dict(input_dropout=0.25),
}
CELLS = ("LSTM", "GRU")


class LoopModel(nn.Module):
    """One layer as a Python loop over the steps of torch.nn cells, torch.nn.LayerNorm and
    dropout masks: the model a user writes for these options without rnnfast."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused  # the rnnfast layer whose parameters and options it shares
        self.kind = fused.mode
        options = fused._options
        self.options = options
        if options.layer_norm:
            # LayerNorm modules whose weights are views of the fused layer's parameters.
            self.norm_ih = nn.LayerNorm(fused.weight_ih_l0.shape[0], elementwise_affine=False)
            self.norm_hh = nn.LayerNorm(fused.weight_hh_l0.shape[0], elementwise_affine=False)
            self.norm_cell = nn.LayerNorm(fused.hidden_size, elementwise_affine=False)

    def forward(self, x):
        f, o = self.fused, self.options
        steps, batch, _ = x.shape
        hidden = f.hidden_size
        h = x.new_zeros(batch, hidden)
        c = x.new_zeros(batch, hidden)
        if self.training and o.input_dropout:
            x = x * torch.empty(batch, x.shape[2], dtype=x.dtype).bernoulli_(1 - o.input_dropout).div_(
                1 - o.input_dropout)
        recurrent_mask = None
        if self.training and o.recurrent_dropout:
            recurrent_mask = torch.empty(batch, hidden, dtype=x.dtype).bernoulli_(1 - o.recurrent_dropout).div_(
                1 - o.recurrent_dropout)
        zoneout_masks = None
        if self.training and o.zoneout:
            zoneout_masks = functional._zoneout_mask((steps, batch, hidden), o.zoneout, x)
        outputs = []
        for t in range(steps):
            h_in = h * recurrent_mask if recurrent_mask is not None else h
            if o.layer_norm:
                xg = self.norm_ih(x[t] @ f.weight_ih_l0.T) * f.layer_norm_ih_weight_l0 + f.bias_ih_l0
                hg = self.norm_hh(h_in @ f.weight_hh_l0.T) * f.layer_norm_hh_weight_l0 + f.bias_hh_l0
                if self.kind == "LSTM":
                    i, fg, g, og = (xg + hg).chunk(4, 1)
                    c_new = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
                    c_out = (self.norm_cell(c_new) * f.layer_norm_cell_weight_l0
                             + f.layer_norm_cell_bias_l0)
                    h_new = torch.sigmoid(og) * torch.tanh(c_out)
                else:
                    xr, xz, xn = xg.chunk(3, 1)
                    hr, hz, hn = hg.chunk(3, 1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                    h_new = (1 - z) * n + z * h
            elif self.kind == "LSTM":
                h_new, c_new = torch._VF.lstm_cell(x[t], (h_in, c), f.weight_ih_l0,
                                                   f.weight_hh_l0, f.bias_ih_l0, f.bias_hh_l0)
            else:
                gru_h = torch._VF.gru_cell(x[t], h_in, f.weight_ih_l0, f.weight_hh_l0,
                                           f.bias_ih_l0, f.bias_hh_l0)
                if recurrent_mask is not None:
                    # Keras' GRU drops h only in the recurrent product, not in z * h_prev: the
                    # fused cell's z * h_in is corrected to z * h.
                    z = torch.sigmoid((x[t] @ f.weight_ih_l0[hidden:2 * hidden].T
                                       + f.bias_ih_l0[hidden:2 * hidden])
                                      + (h_in @ f.weight_hh_l0[hidden:2 * hidden].T
                                         + f.bias_hh_l0[hidden:2 * hidden]))
                    gru_h = gru_h + z * (h - h_in)
                h_new = gru_h
            if zoneout_masks is not None:
                h_new = zoneout_masks[t] * h + (1 - zoneout_masks[t]) * h_new
            elif not self.training and o.zoneout:
                h_new = o.zoneout * h + (1 - o.zoneout) * h_new
            h = h_new
            if self.kind == "LSTM":
                c = c_new
            outputs.append(h)
        return torch.stack(outputs), h


def check_same_model(fused, loop, x):
    """The loop computes the fused layer's model: same output for the same masks (float64)."""
    fused64 = type(fused)(fused.input_size, fused.hidden_size, dtype=torch.float64,
                          **_option_kwargs(fused._options))
    fused64.load_state_dict(fused.state_dict())
    loop64 = LoopModel(fused64)
    x64 = x.double()
    torch.manual_seed(7)
    expected = fused64(x64)[0]
    torch.manual_seed(7)
    got = loop64(x64)[0]
    error = (expected - got).abs().max().item()
    if error > 1e-8:
        raise AssertionError(f"the loop and the fused layer differ by {error}")
    return error


def gemm_rate_gflops(size=2048, repeats=5):
    """This machine's float32 GEMM rate on the threads in use: 2 size^3 over the best of
    `repeats` torch.mm of [size, size] matrices, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def training_step_flops(cell, batch, steps, hidden):
    """The floating-point operations of one training step's products (input size = hidden, as in
    SHAPES; the input takes no gradient): forward x W_ih^T and h W_hh^T, backward the gradients
    of W_ih, of h and of W_hh, five products of 2 * steps * batch * gates * hidden each."""
    gates = {"LSTM": 4, "GRU": 3}[cell] * hidden
    return 5 * 2 * steps * batch * gates * hidden


def _option_kwargs(options):
    defaults = functional.CellOptions()
    return {k: v for k, v in options._asdict().items() if v != getattr(defaults, k)}


def train_step(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x)[0].sum().backward()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--filter", default=None, help="only rows whose 'cell/feature/shape' has it")
    p.add_argument("--quick", action="store_true", help="few repeats (a smoke test)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_lib.timing_config("cpu", quick=args.quick)
    timer = bench_lib.timer_for("cpu")
    rows = []
    load_at_start = bench_lib.load_average()
    gemm_rate = gemm_rate_gflops(size=512 if args.quick else 2048)
    # Taken before the run: opening a committed results file for writing would show the
    # checkout as changed.
    environment = {"cpu_model": bench_lib.cpu_model(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "load_average_at_start": load_at_start, "gemm_rate_gflops": gemm_rate,
                   "git": bench_lib.git_info()}
    print(f"CPU: {bench_lib.cpu_model()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, load average {load_at_start}, float32 GEMM rate "
          f"{gemm_rate:.0f} GFLOP/s")
    print("| cell | option | shape | plain ms | option ms | loop ms | cost (<= 1.3) | "
          "speed-up (>= 5) | ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in CELLS:
        for feature, options in FEATURES.items():
            for name, batch, steps, hidden in SHAPES:
                label = f"{cell}/{feature}/{name}"
                if args.filter and args.filter.lower() not in label.lower():
                    continue
                torch.manual_seed(0)
                module_class = getattr(rnnfast, cell)
                plain = module_class(hidden, hidden)
                fused = module_class(hidden, hidden, **options)
                fused.load_state_dict(plain.state_dict(), strict=False)
                loop = LoopModel(fused)
                x = torch.randn(steps, batch, hidden)
                check_same_model(fused, loop, x[:4, :3])
                cost = bench_lib.measure_pair(train_step(plain, x), train_step(fused, x), timer,
                                              cfg)
                versus_loop = bench_lib.measure_pair(train_step(loop, x), train_step(fused, x),
                                                     timer, cfg)
                products_ms = training_step_flops(cell, batch, steps, hidden) / gemm_rate / 1e6
                row = {"cell": cell, "feature": feature, "shape": name,
                       "plain_ms": cost["torch_median_ms"], "option_ms": cost["rnnfast_median_ms"],
                       "loop_ms": versus_loop["torch_median_ms"],
                       "cost": 1 / cost["speedup"], "speedup_over_loop": versus_loop["speedup"],
                       "speedup_ceiling": versus_loop["torch_median_ms"] / products_ms}
                rows.append(row)
                print(f"| {cell} | {feature} | {name} | {row['plain_ms']:.2f} | "
                      f"{row['option_ms']:.2f} | {row['loop_ms']:.2f} | {row['cost']:.2f} | "
                      f"{row['speedup_over_loop']:.1f} | {row['speedup_ceiling']:.1f} |",
                      flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"environment": environment, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
