"""The course tasks: the recurrent-network exercises of the course material,
run on rnnfast's own layers.

Command line::

    python -m rnnfast.tasks list
    python -m rnnfast.tasks NAME [--quick] [--epochs N] [--device cpu|cuda]
                                 [--seed S] [--data PATH] [--out DIR]
    python -m rnnfast.tasks all  [same options]

From Python: ``rnnfast.tasks.main(["adding", "--quick"])`` returns the exit
status; ``rnnfast.tasks.run_task("adding", quick=True, out=...)`` returns the
task's :class:`~rnnfast.tasks.common.Result`.
"""

import argparse
import datetime as _dt
import importlib
import sys
import time
import traceback
from pathlib import Path

# name -> (module, one-line description); the order of `list` and `all`.
TASKS = {
    "tiny-rnn": ("tiny_rnn", "3 steps of a scalar sigmoid RNN computed with rnnfast.RNN"),
    "adding": ("adding", "dynamic adding problem: Elman net vs LSTM (2 hidden units)"),
    "sine": ("sine", "noisy sine, 4 values -> next, Elman(32, relu) + dense layers"),
    "energy": ("energy", "extrapolating many-body energies with Elman/LSTM/GRU stacks"),
    "fashion-mnist": ("fashion_mnist", "Fashion-MNIST rows as 28 time steps, LSTM(30)"),
    "memorize": ("memorize", "memorise a sentence with 2 x GRU(50), stateful generation"),
    "imdb": ("imdb", "IMDB sentiment: Embedding + Elman(5, relu)"),
    "sales": ("sales", "retail sales forecast: LSTM(100, activation relu)"),
    "seq2seq": ("seq2seq", "GRU encoder-decoder with attention sorting digit strings, greedy vs beam"),
}

EXIT_OK, EXIT_FAILED, EXIT_DATA = 0, 1, 2


def load_module(name):
    return importlib.import_module(f"{__name__}.{TASKS[name][0]}")


def _timestamp():
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_task(name, out=None, device=None, seed=None, quick=False, epochs=None, data=None,
             progress=True, threads=None, argv=None):
    """Run one task; return (result, wall_seconds, context).  Raises DataError
    when its data is missing or malformed.

    On the CPU the task runs with ``threads`` intra-op threads (default 1: the
    models are tiny, and more threads only add synchronisation overhead)."""
    import torch
    from .common import Context, Timer, require_task_extras, seed_everything, write_result
    require_task_extras()
    module = load_module(name)
    if seed is None:
        seed = getattr(module, "DEFAULT_SEED", 0)
    out = Path(out) if out else Path("runs") / f"{name}-{_timestamp()}"
    ctx = Context(name, out, device=device, seed=seed, quick=quick, epochs=epochs, data=data,
                  progress=progress)
    seed_everything(ctx.seed)
    saved_threads = torch.get_num_threads()
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, threads or 1))
    try:
        with Timer() as t:
            result = module.run(ctx)
    finally:
        torch.set_num_threads(saved_threads)
    write_result(ctx, module, result, t.elapsed, argv)
    return result, t.elapsed, ctx


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m rnnfast.tasks",
        description="Run the course tasks on rnnfast's recurrent layers.",
        epilog="tasks: " + ", ".join(TASKS))
    p.add_argument("task", help="'list', 'all', or a task name")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds per task")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the task's)")
    p.add_argument("--data", default=None,
                   help="data file or folder (default: $RNNFAST_DATA, else ../shared/data "
                        "beside the project, else ./data)")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/<task>-<timestamp>; for 'all' one "
                        "subfolder per task)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1: the models are small)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn only when stderr is a terminal)")
    return p


def _list():
    from .common import default_data_dir
    width = max(map(len, TASKS))
    for name, (_, desc) in TASKS.items():
        print(f"{name.ljust(width)}  {desc}")
    print(f"\ndata folder: {default_data_dir()}")
    return EXIT_OK


def _line(name, result, wall, ctx):
    return f"[{name}] {result.summary}  ({wall:.1f} s on {ctx.device}, output in {ctx.out})"


def main(argv=None):
    """The command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from .common import DataError, TaskFailed, require_task_extras, resolve_device
    if args.task == "list":
        return _list()
    try:
        require_task_extras()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.task != "all" and args.task not in TASKS:
        print(f"error: unknown task {args.task!r}; choose one of: list, all, "
              + ", ".join(TASKS), file=sys.stderr)
        return EXIT_DATA
    if args.epochs is not None and args.epochs < 1:
        print("error: --epochs must be at least 1", file=sys.stderr)
        return EXIT_DATA
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DATA
    opts = dict(device=device, seed=args.seed, quick=args.quick, epochs=args.epochs,
                data=args.data, progress=not args.no_progress, threads=args.threads, argv=argv)

    if args.task != "all":
        try:
            result, wall, ctx = run_task(args.task, out=args.out, **opts)
        except DataError as err:
            print(f"error: task {args.task}: {err}", file=sys.stderr)
            return EXIT_DATA
        except TaskFailed as err:
            print(f"error: task {args.task}: {err}", file=sys.stderr)
            return EXIT_FAILED
        print(_line(args.task, result, wall, ctx), flush=True)
        return EXIT_OK

    return _run_all(args, opts)


def _run_all(args, opts):
    from .common import DataError, fmt_value, format_table
    root = Path(args.out) if args.out else Path("runs") / f"all-{_timestamp()}"
    rows, skipped, failed = [], [], []
    t_all = time.perf_counter()
    for name in TASKS:
        try:
            result, wall, ctx = run_task(name, out=root / name, **opts)
        except DataError as err:
            print(f"[{name}] skipped: {err}", file=sys.stderr, flush=True)
            skipped.append((name, str(err)))
            continue
        except Exception as err:  # keep going; report at the end
            traceback.print_exc()
            print(f"[{name}] FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            failed.append((name, f"{type(err).__name__}: {err}"))
            continue
        print(_line(name, result, wall, ctx), flush=True)
        for i, m in enumerate(result.metrics):
            rows.append([name, m.model, m.name, fmt_value(m.value, m.fmt),
                         "" if m.reference is None else fmt_value(m.reference, m.fmt),
                         f"{wall:.1f} s" if i == 0 else ""])
    for name, why in skipped:
        rows.append([name, "-", "skipped", why if len(why) < 60 else why[:57] + "...", "", ""])
    for name, why in failed:
        rows.append([name, "-", "FAILED", why if len(why) < 60 else why[:57] + "...", "", ""])
    table = format_table(rows, ["task", "model", "metric", "value", "reference", "time"])
    total = time.perf_counter() - t_all
    print()
    print(table)
    print(f"\n{len(TASKS) - len(skipped) - len(failed)} tasks ran, {len(skipped)} skipped, "
          f"{len(failed)} failed, {total:.0f} s in all; outputs in {root}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table + "\n")
    return EXIT_FAILED if failed else EXIT_OK
