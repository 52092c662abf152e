#!/usr/bin/env python
"""Benchmark rnnfast against torch.nn (LSTM, GRU, Elman RNN) in one process.

    python benchmarks/run.py --device cpu                      # course shapes + CPU grid
    python benchmarks/run.py --device cuda                     # float32 and bfloat16
    python benchmarks/run.py --device cpu --quick --json out.json --plot out.png

For every shape both modules get identical weights (rnnfast's load_state_dict of the torch.nn
module's state_dict) and the same batch_first input, and are timed interleaved after warm-up
(median of the repeats) for (a) the forward pass under torch.no_grad() and (b) a training step
(zero_grad, forward, output.sum().backward(); parameters require grad, the input does not).
The peak memory of one training step of each is measured too.  Prints a Markdown table per
group, the geometric means and a check of the project's targets; exits 0 either way.
See benchmarks/README.md.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_lib  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: float32 on cpu; both float32 and bfloat16 on cuda")
    p.add_argument("--quick", action="store_true",
                   help="a handful of course shapes and 2 grid shapes, few repeats")
    p.add_argument("--json", metavar="PATH", help="write every raw figure to this JSON file")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speedups")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (cpu; default: torch's)")
    p.add_argument("--filter", metavar="SUBSTRING", default=None,
                   help="only rows whose 'group/shape/cell' contains it (case-insensitive), "
                        "e.g. adding, grid/B16, GRU")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats per measurement (default: adaptive)")
    p.add_argument("--no-mkldnn", action="store_true",
                   help="run the torch.nn side with torch.backends.mkldnn disabled (cpu: "
                        "torch.nn.LSTM's aten per-step path instead of oneDNN's fused LSTM); "
                        "not the default, not what the targets are about")
    return p.parse_args(argv)


def _threads():
    n = torch.get_num_threads()
    return f"{n} thread{'' if n == 1 else 's'}"


def write_json(path, result):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype:
        dtypes = [args.dtype]
    else:
        dtypes = ["float32", "bfloat16"] if device == "cuda" else ["float32"]

    notes = []
    if device == "cuda":
        # TF32 off for both sides: float32 means float32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        notes.append("TF32 off for both torch.nn and rnnfast "
                     "(torch.backends.cuda.matmul.allow_tf32 = False, "
                     "torch.backends.cudnn.allow_tf32 = False); "
                     f"cudnn.benchmark = {torch.backends.cudnn.benchmark}")

    if device == "cpu":
        if args.no_mkldnn:
            notes.append("--no-mkldnn: torch.nn runs with torch.backends.mkldnn disabled "
                         "(torch.nn.LSTM on its aten per-step path), NOT torch's default")
        elif torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
            notes.append("torch.nn.LSTM on CPU (float32) runs oneDNN's fused LSTM kernels "
                         "(forward and backward); torch.nn.GRU and RNN run aten ops per "
                         "time step")
    try:
        import rnnfast
    except Exception as exc:
        print(f"error: cannot import rnnfast ({type(exc).__name__}: {exc}); build it with "
              "`pip install -e . --no-build-isolation`", file=sys.stderr)
        return 2

    argv_list = list(sys.argv if argv is None else ["benchmarks/run.py"] + list(argv))
    env = bench_lib.environment(device, argv_list)
    cfg = bench_lib.timing_config(device, quick=args.quick, repeats=args.repeats)
    timer = bench_lib.timer_for(device)
    all_cases = bench_lib.cases(device, quick=args.quick, filter_text=args.filter)
    if not all_cases:
        print(f"no rows match --filter {args.filter!r}", file=sys.stderr)

    mem_method = bench_lib.CUDA_MEMORY_METHOD if device == "cuda" else bench_lib.CPU_MEMORY_METHOD
    result = {
        "schema": bench_lib.SCHEMA,
        "environment": env,
        "settings": {
            "device": device, "dtypes": dtypes, "quick": args.quick, "filter": args.filter,
            "threads": torch.get_num_threads(), "repeats": args.repeats,
            "torch_mkldnn": not args.no_mkldnn,
            "timing": {**vars(cfg), "timer": timer.name,
                       "method": "interleaved torch/rnnfast per repeat (first side alternates), "
                                 "after warm-up; each sample = mean of n back-to-back calls; "
                                 "figures are the median over repeats"},
            "forward": "module(x) under torch.no_grad(), batch_first, zero initial state",
            "train": "module.zero_grad(set_to_none=True); out, _ = module(x); "
                     "out.sum().backward() (parameters require grad, x does not)",
            "memory_method": mem_method,
            "notes": notes,
        },
        "groups": [],
        "targets": [],
        "plot": None,
    }

    print(f"# rnnfast benchmark: {device}, {', '.join(dtypes)}"
          f"{' (quick)' if args.quick else ''}")
    print(f"torch {env['torch_version']}, rnnfast {env.get('rnnfast_version')}, "
          f"{_threads()}, CPU: {env['cpu_model']}")
    if device == "cuda":
        print(f"GPU: {env.get('gpu_name')} (driver {env.get('gpu_driver')}, "
              f"cuDNN {env.get('cudnn_version')}, CUDA {env.get('torch_cuda')})")
    for n in notes:
        print(n)
    git = env["git"]
    print(f"git {git['commit']}{' (dirty)' if git['dirty'] else ''}, {env['date_utc']}")
    load = env.get("load_average_start")
    if load and device == "cpu" and load[0] > 0.5 * (env.get("cpu_affinity") or 1):
        print(f"warning: load average {load[0]} on {env.get('cpu_affinity')} cores before the "
              "run: other work on the machine makes CPU timings noisy (multi-threaded steps "
              "most of all; --threads 1 is far steadier on a busy machine)")
    print()

    t_start = time.perf_counter()
    n_total = len(all_cases) * len(dtypes)
    i = 0
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for group_name in ("course", "grid", "models"):
            group_cases = [c for c in all_cases if c.group == group_name]
            if not group_cases:
                continue
            group = {"name": group_name, "dtype": dtype_name, "rows": [], "geomean": None}
            result["groups"].append(group)
            for case in group_cases:
                i += 1
                t0 = time.perf_counter()
                row = bench_lib.run_case(case, device, dtype, cfg, timer=timer,
                                         rnnfast_module=rnnfast,
                                         torch_mkldnn=not args.no_mkldnn)
                group["rows"].append(row)
                group["geomean"] = bench_lib.group_summary(group["rows"])
                if row["error"]:
                    status = f"ERROR {row['error'][:200]}"
                else:
                    status = (f"fwd {row['forward']['speedup']:6.2f}x  "
                              f"train {row['train']['speedup']:6.2f}x  "
                              f"mem {row['memory']['ratio'] or float('nan'):.2f}"
                              f"{bench_lib.round_trip_note(row)}")
                print(f"[{i:3d}/{n_total}] {dtype_name:8s} {case.label:36s} {status}  "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
                if args.json:  # keep what is measured so far if the run is cut short
                    write_json(args.json, result)

    result["elapsed_s"] = time.perf_counter() - t_start
    env["load_average_end"] = bench_lib.load_average()
    result["targets"] = bench_lib.evaluate_targets(device, result["groups"])

    print()
    print(bench_lib.markdown_tables(result["groups"]))
    print()
    print(f"Timings: median of the repeats, milliseconds per call; speedup = torch / rnnfast. "
          f"Peak memory: {mem_method}; ratio = rnnfast / torch.")
    for n in notes:
        print(n)
    print()
    print("## Targets")
    print(bench_lib.format_targets(result["targets"]))
    print(f"\n(total {result['elapsed_s']:.0f}s; load average before {env.get('load_average_start')},"
          f" after {env.get('load_average_end')})")

    if args.plot:
        if device == "cuda":
            title = f"rnnfast vs torch.nn on {env.get('gpu_name')}"
        else:
            title = (f"rnnfast vs torch.nn on cpu: {env['cpu_model']}, "
                     f"{_threads()}")
        bench_lib.plot_speedups(result["groups"], args.plot, title=title)
        result["plot"] = args.plot
        print(f"plot: {args.plot}")
    if args.json:
        write_json(args.json, result)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
