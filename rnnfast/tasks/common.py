"""Shared plumbing of the course tasks: run context, seeding, device choice,
data location, progress bars, plots, result.json and the summary table."""

import datetime as _dt
import importlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rnnfast.data import DataError

__all__ = ["Context", "DataError", "Metric", "Result", "TaskFailed", "default_data_dir",
           "resolve_data", "resolve_device", "seed_everything", "format_table", "versions"]

# The project root is the directory containing setup.py, two levels above this package.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class TaskFailed(RuntimeError):
    """A task ran but could not produce its result (message is user-facing)."""


# The packages the tasks need beyond rnnfast's own: the extra rnnfast[tasks] (setup.py).
TASK_EXTRAS = ("tqdm", "matplotlib")


def require_task_extras():
    """Raises ImportError naming what to install when a package of rnnfast[tasks] is missing."""
    missing = []
    for name in TASK_EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"the course tasks need {' and '.join(missing)}, which cannot be imported: "
            f"pip install 'rnnfast[tasks]' (or: pip install {' '.join(missing)})")


# --------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------


def default_data_dir():
    """``$RNNFAST_DATA``, else ``../shared/data`` beside the project root if it
    exists, else ``./data``."""
    env = os.environ.get("RNNFAST_DATA")
    if env:
        return Path(env)
    shared = PROJECT_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path("data")


def resolve_data(path=None):
    """The data location a task reads: ``path`` (a file or a folder) if given,
    else :func:`default_data_dir`."""
    return Path(path) if path else default_data_dir()


def resolve_device(name=None):
    """``cuda`` if available else ``cpu``; an explicit ``cuda`` without a GPU is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return dev


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions():
    try:
        import rnnfast
        rv = getattr(rnnfast, "__version__", None)
    except Exception:  # pragma: no cover - rnnfast itself failing to import
        rv = None
    if rv is None:
        try:
            from importlib.metadata import version
            rv = version("rnnfast")
        except Exception:
            rv = "unknown"
    return {"rnnfast": str(rv), "torch": torch.__version__}


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------


@dataclass
class Metric:
    model: str
    name: str
    value: object          # a number (or a short string, e.g. generated text)
    reference: object = None  # the seed's figure where one exists
    fmt: str = None        # format spec for the table, e.g. ".6f"

    def as_dict(self):
        return {"model": self.model, "metric": self.name, "value": _clean(self.value),
                "reference": _clean(self.reference)}


@dataclass
class Result:
    """What a task returns: its models, metrics, a one-line summary and details."""
    models: list
    metrics: list
    summary: str
    reference: str = None          # the seed's reference figure, in words
    details: dict = field(default_factory=dict)
    epochs: object = None          # epochs actually run (an int, or a dict per model)

    def value(self, model, name):
        for m in self.metrics:
            if m.model == model and m.name == name:
                return m.value
        raise KeyError((model, name))


def _clean(v):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def fmt_value(v, spec=None):
    if spec and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    s = str(v)
    return s if len(s) <= 70 else s[:67] + "..."


def format_table(rows, headers):
    """A Markdown table (also readable as plain text)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


# --------------------------------------------------------------------------
# run context
# --------------------------------------------------------------------------


class Context:
    """Everything a task's ``run(ctx)`` needs: options, device, seed, where its
    data is, where its outputs go, plus helpers for progress bars and plots."""

    def __init__(self, task, out, device=None, seed=0, quick=False, epochs=None, data=None,
                 progress=True):
        self.task = task
        self.out = Path(out)
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.seed = int(seed)
        self.quick = bool(quick)
        self.epochs_override = epochs
        self.data = resolve_data(data)
        self.data_given = data is not None
        # A bar redraws itself many times a second: in a log file (stderr not a terminal)
        # every redraw would be a line of its own.
        self.show_progress = progress and sys.stderr.isatty()
        self.plots = []
        self.rng = np.random.default_rng(self.seed)

    # options -------------------------------------------------------------
    def epochs(self, full, quick=None):
        """``--epochs`` if given, else ``quick`` in quick mode, else ``full``."""
        if self.epochs_override is not None:
            return int(self.epochs_override)
        return int(quick if (self.quick and quick is not None) else full)

    def pick(self, full, quick):
        return quick if self.quick else full

    # progress ------------------------------------------------------------
    def progress(self, total, desc, unit="epoch"):
        """A tqdm bar on stderr, drawn only when stderr is a terminal;
        ``bar.set_postfix(loss=...)`` shows the running loss."""
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=f"{self.task}: {desc}", unit=unit, leave=False,
                    dynamic_ncols=True, mininterval=0.25, file=sys.stderr,
                    disable=not self.show_progress)

    # plots ---------------------------------------------------------------
    def figure(self, *args, **kwargs):
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        kwargs.setdefault("figsize", (7, 4.2))
        return plt.subplots(*args, **kwargs)

    def savefig(self, fig, name):
        import matplotlib.pyplot as plt
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / (name if name.endswith(".png") else name + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        self.plots.append(path.name)
        return path

    # data ----------------------------------------------------------------
    def tensor(self, array, dtype=torch.float32):
        return torch.as_tensor(np.asarray(array), dtype=dtype, device=self.device)


def write_result(ctx, module, result, wall, argv=None):
    """result.json in the task's output folder."""
    v = versions()
    doc = {
        "task": ctx.task,
        "title": getattr(module, "TITLE", ""),
        "seed_source": getattr(module, "SOURCE", ""),
        "models": list(result.models),
        "metrics": [m.as_dict() for m in result.metrics],
        "values": {f"{m.model}/{m.name}": _clean(m.value) for m in result.metrics},
        "reference": result.reference,
        "summary": result.summary,
        "wall_time_s": round(wall, 3),
        "device": str(ctx.device),
        "rnnfast_version": v["rnnfast"],
        "torch_version": v["torch"],
        "seed": ctx.seed,
        "quick": ctx.quick,
        "epochs": _clean(result.epochs),
        "data": str(result.details.pop("data_source", "")) or None,
        "plots": list(ctx.plots),
        "details": _clean(result.details),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m rnnfast.tasks " + " ".join(argv) if argv else None,
    }
    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / "result.json"
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return path


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0


# --------------------------------------------------------------------------
# Keras' default initialisation, for models taken from Keras code
# --------------------------------------------------------------------------


@torch.no_grad()
def keras_init(module):
    """Re-initialise ``module`` as Keras would: Glorot-uniform input kernels and
    dense layers, orthogonal recurrent kernels, zero biases, forget-gate bias 1
    for LSTMs (``unit_forget_bias``).  Works on any module holding rnnfast
    recurrent layers (torch.nn's parameter names) and ``nn.Linear`` layers."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                sub.bias.zero_()
            continue
        mode = type(sub).__name__
        if mode not in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"):
            mode = str(getattr(sub, "mode", ""))    # e.g. a reference implementation
        gates = 4 if mode.startswith("LSTM") else 3 if mode.startswith("GRU") else \
            1 if mode.startswith("RNN") else None
        if gates is None or not hasattr(sub, "hidden_size"):
            continue
        for name, p in sub.named_parameters(recurse=False):
            if name.startswith("weight_ih"):
                torch.nn.init.xavier_uniform_(p)          # fans: input, gates*hidden
            elif name.startswith("weight_hh"):
                h = p.shape[1]
                for g in range(gates):                    # Keras: one orthogonal (h, gates*h)
                    torch.nn.init.orthogonal_(p[g * h:(g + 1) * h])
            elif name.startswith("bias"):
                p.zero_()
                if mode.startswith("LSTM") and name.startswith("bias_ih"):
                    h = p.shape[0] // 4
                    p[h:2 * h] = 1.0                      # torch gate order i, f, g, o
