#!/usr/bin/env python
"""The framework's floor of run.py's training step: the largest speedup over torch.nn that any
implementation of a shape could show there.

    python benchmarks/floor.py --threads 2                  # the course shapes
    python benchmarks/floor.py --threads 2 --filter grid/   # the CPU grid

run.py's training step is `zero_grad(set_to_none=True); out, _ = module(x); out.sum().backward()`.
Part of its time is torch's own, whatever the layer does: zero_grad dropping each parameter's
.grad, the module call, the sum and its backward, the autograd engine's graph task and one
AccumulateGrad node per parameter. The stand-in here (`WithoutWork`) has torch.nn's parameters
and runs that step with a layer that computes nothing: one autograd node over all parameters
that returns a zeroed output of the layer's shape and, in the backward, unwritten gradients of
the parameters' shapes. torch.nn's time over the stand-in's, measured interleaved in one
process as run.py measures, is the ceiling of the speedup in that harness; rnnfast's speedup is
measured beside it. The node is a Python autograd.Function: a C++ node would cost a few
microseconds less (the stand-in's step with torch.cat over the parameters' views instead ran
about 2 us faster on the one-layer, 32-unit course shape), so on the shapes whose step is
mostly the framework the ceiling is that much too low.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_lib  # noqa: E402


class _NoWork(torch.autograd.Function):
    """One graph node over every parameter that computes nothing."""

    @staticmethod
    def forward(ctx, output_shape, *parameters):
        ctx.parameter_shapes = [p.shape for p in parameters]
        return parameters[0].new_zeros(output_shape)

    @staticmethod
    def backward(ctx, grad_output):
        # Allocated as a layer's gradients would be, not written.
        return (None, *(grad_output.new_empty(shape) for shape in ctx.parameter_shapes))


class WithoutWork(torch.nn.Module):
    """The parameters of a torch.nn recurrent module (same names, shapes and values) and a
    forward that returns (output, None) with output [B, T, D * P] (batch_first) computed by
    nothing but `_NoWork`."""

    def __init__(self, reference):
        super().__init__()
        for name, parameter in reference.named_parameters():
            self.register_parameter(name, torch.nn.Parameter(parameter.detach().clone()))
        directions = 2 if reference.bidirectional else 1
        self.output_width = directions * (reference.proj_size or reference.hidden_size)
        self._all_parameters = list(self.parameters())

    def forward(self, x):
        batch, steps, _ = x.shape
        return _NoWork.apply((batch, steps, self.output_width), *self._all_parameters), None


def measure_case(case, cfg, timer, rnnfast_module):
    """torch.nn against the stand-in and against rnnfast, a training step each (float32)."""
    reference, fast = bench_lib.make_pair(case, "cpu", torch.float32,
                                          rnnfast_module=rnnfast_module)
    stand_in = WithoutWork(reference)
    x = bench_lib.make_input(case, "cpu", torch.float32)
    floor = bench_lib.measure_pair(bench_lib.train_step(reference, x),
                                   bench_lib.train_step(stand_in, x), timer, cfg)
    rnnfast = bench_lib.measure_pair(bench_lib.train_step(reference, x),
                                     bench_lib.train_step(fast, x), timer, cfg)
    return {"label": case.label, "case": asdict(case),
            "floor": floor, "rnnfast": rnnfast,
            "ceiling": floor["speedup"], "speedup": rnnfast["speedup"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: torch's)")
    p.add_argument("--filter", metavar="SUBSTRING", default="course/",
                   help="rows whose group/shape/cell contains it (default: course/)")
    p.add_argument("--quick", action="store_true", help="3 repeats, short warm-up")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats per measurement instead of the adaptive count")
    p.add_argument("--json", metavar="PATH", help="write every raw figure to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import rnnfast

    argv_list = list(sys.argv if argv is None else ["benchmarks/floor.py"] + list(argv))
    env = bench_lib.environment("cpu", argv_list)
    cfg = bench_lib.timing_config("cpu", quick=args.quick, repeats=args.repeats)
    timer = bench_lib.timer_for("cpu")
    rows_to_run = bench_lib.cases("cpu", filter_text=args.filter)
    if not rows_to_run:
        print(f"no rows match --filter {args.filter!r}", file=sys.stderr)
        return 2
    print(f"# The framework's floor of a training step: torch {env['torch_version']}, "
          f"{torch.get_num_threads()} threads, CPU: {env['cpu_model']}")
    print()
    print("| shape | cell | torch ms | floor ms | rnnfast ms | ceiling | rnnfast |")
    print("|---|---|---|---|---|---|---|")
    t_start = time.perf_counter()
    rows = []
    for case in rows_to_run:
        row = measure_case(case, cfg, timer, rnnfast)
        rows.append(row)
        print(f"| {case.shape} | {case.cell} | {row['floor']['torch_median_ms']:.4f} | "
              f"{row['floor']['rnnfast_median_ms']:.4f} | "
              f"{row['rnnfast']['rnnfast_median_ms']:.4f} | {row['ceiling']:.2f}x | "
              f"{row['speedup']:.2f}x |", flush=True)
    print()
    print("floor: the stand-in with torch.nn's parameters that computes nothing; ceiling = "
          "torch / floor, the largest speedup any layer could show; rnnfast = torch / rnnfast "
          "(each measured interleaved with torch.nn, median of the repeats)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "timing": vars(cfg), "rows": rows,
                       "elapsed_s": time.perf_counter() - t_start}, f, indent=1, default=str)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
