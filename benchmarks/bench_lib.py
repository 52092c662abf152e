"""The timing, memory and reporting logic behind benchmarks/run.py, importable on its own.

Everything here compares torch.nn and rnnfast in one process:

* ``cases(...)`` lists the shapes (course tasks and the size grids);
* ``make_pair(case, ...)`` builds a torch.nn module and the rnnfast module with the same
  constructor arguments and ``load_state_dict(torch_module.state_dict())``;
* ``measure_pair(...)`` times the two interleaved (torch and rnnfast alternate, the one that
  goes first alternates per repeat) after warm-up and keeps every repeat;
* ``peak_train_bytes(...)`` measures the peak of live bytes during one training step (CUDA:
  the caching allocator's peak statistics; CPU: the torch profiler's allocation and free
  events, summed in time order);
* ``evaluate_targets(...)``, ``markdown_tables(...)`` and ``plot_speedups(...)`` turn the
  results into the report.
"""
import contextlib
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMA = "rnnfast-benchmark/1"
MODES = ("forward", "train")


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One benchmark row: a module configuration and an input shape (batch_first)."""
    group: str          # "course" or "grid"
    shape: str          # e.g. "adding", "B16-T100-H256"
    cell: str           # "LSTM", "GRU", "Elman" (tanh) or "Elman-relu"
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    note: str = ""
    bidirectional: bool = False
    dropout: float = 0.0         # between layers, in training (the forward runs in eval mode)
    initial_state: bool = False  # hx (and cx) given, as a language model carries them
    packed_lengths: tuple = None  # (shortest, longest): a PackedSequence of lengths in that range

    @property
    def kind(self):
        return {"LSTM": "LSTM", "GRU": "GRU"}.get(self.cell, "RNN")

    @property
    def nonlinearity(self):
        """The Elman nonlinearity (None for LSTM and GRU)."""
        if self.kind != "RNN":
            return None
        return "relu" if self.cell.endswith("relu") else "tanh"

    @property
    def label(self):
        return f"{self.group}/{self.shape}/{self.cell}"

    @property
    def dims(self):
        return (f"({self.batch}, {self.seq_len}, {self.input_size}, {self.hidden_size}, "
                f"{self.num_layers})")

    @property
    def training_only_dropout(self):
        """Dropout acts in training only: the forward row runs the modules in eval mode."""
        return self.dropout > 0


SIGMOID_NOTE = ("the seed uses a sigmoid Elman here; torch.nn.RNN has no sigmoid, so both sides "
                "use tanh")

# (shape, cell, B, T, input, hidden, layers, note)
COURSE_SHAPES = [
    ("adding", "LSTM", 3, 3000, 2, 2, 1, ""),
    ("adding", "Elman", 3, 3000, 2, 2, 1, ""),
    ("sine", "Elman-relu", 16, 1, 4, 32, 1, ""),
    ("energy", "Elman", 10, 2, 1, 200, 1, ""),
    ("energy-2layer", "Elman", 10, 2, 1, 500, 2, SIGMOID_NOTE),
    ("energy-2layer", "LSTM", 10, 2, 1, 250, 2, ""),
    ("energy-2layer", "GRU", 10, 2, 125, 250, 2, ""),
    ("fashion-mnist", "LSTM", 128, 28, 28, 30, 1, ""),
    ("memorize", "GRU", 1, 66, 25, 50, 2, ""),
    ("imdb", "Elman-relu", 32, 30, 50, 5, 1, ""),
    ("sales", "LSTM", 1, 12, 1, 100, 1, ""),
]

GRID_CELLS = ("LSTM", "GRU", "Elman")
CPU_GRID = dict(batches=(1, 16, 64), seq_lens=(100,), hiddens=(64, 256, 512))
CUDA_GRID = dict(batches=(1, 16, 64, 256), seq_lens=(128, 1024), hiddens=(128, 256, 512, 1024))

# --quick: a handful of course shapes and two grid shapes.
QUICK_COURSE = {("adding", "LSTM"), ("sine", "Elman-relu"), ("energy-2layer", "GRU"),
                ("fashion-mnist", "LSTM"), ("imdb", "Elman-relu")}
QUICK_MODELS = {("wordlm-200", "LSTM")}
QUICK_GRID = {"cpu": {("B16-T100-H64", "LSTM"), ("B1-T100-H256", "GRU")},
              "cuda": {("B16-T128-H256", "LSTM"), ("B64-T128-H512", "GRU")}}


# Shapes of real models (shape, cell, B, T, input, hidden, layers, extras):
# pytorch/examples' word_language_model (embedding = hidden, hx carried between batches,
# dropout 0.2 between layers), a seq2seq encoder as pytorch/tutorials' chatbot has it (packed
# sentences of 3-10 words), and a speech recogniser's stack over 80 filterbank features
# (packed utterances of 100-200 frames).
MODEL_SHAPES = [
    (f"wordlm-{hidden}", cell, 20, 35, hidden, hidden, 2,
     dict(dropout=0.2, initial_state=True))
    for hidden in (200, 650) for cell in ("LSTM", "GRU", "Elman")
] + [
    ("seq2seq-encoder", "GRU", 64, 10, 500, 500, 2,
     dict(bidirectional=True, packed_lengths=(3, 10))),
    ("speech", "LSTM", 32, 200, 80, 512, 3, dict(bidirectional=True, packed_lengths=(100, 200))),
]


def course_cases():
    return [Case("course", s, c, b, t, i, h, n, note)
            for (s, c, b, t, i, h, n, note) in COURSE_SHAPES]


def model_cases():
    return [Case("models", s, c, b, t, i, h, n, **extras)
            for (s, c, b, t, i, h, n, extras) in MODEL_SHAPES]


def grid_cases(device):
    grid = CUDA_GRID if device == "cuda" else CPU_GRID
    out = []
    for b in grid["batches"]:
        for t in grid["seq_lens"]:
            for h in grid["hiddens"]:
                for cell in GRID_CELLS:
                    out.append(Case("grid", f"B{b}-T{t}-H{h}", cell, b, t, h, h, 1))
    return out


def cases(device, quick=False, filter_text=None):
    """The benchmark rows for a device, optionally the --quick subset and/or a substring
    filter on "group/shape/cell" (case-insensitive)."""
    rows = course_cases() + grid_cases(device) + model_cases()
    if quick:
        quick_grid = QUICK_GRID["cuda" if device == "cuda" else "cpu"]
        rows = [c for c in rows
                if (c.group == "course" and (c.shape, c.cell) in QUICK_COURSE)
                or (c.group == "grid" and (c.shape, c.cell) in quick_grid)
                or (c.group == "models" and (c.shape, c.cell) in QUICK_MODELS)]
    if filter_text:
        f = filter_text.lower()
        rows = [c for c in rows if f in c.label.lower()]
    return rows


# --------------------------------------------------------------------------------------------
# Modules and steps
# --------------------------------------------------------------------------------------------

def make_pair(case, device, dtype, seed=0, rnnfast_module=None):
    """(torch.nn module, rnnfast module) with identical weights, on device/dtype, batch_first.

    rnnfast_module: the rnnfast package (or anything with LSTM/GRU/RNN); imported if None."""
    if rnnfast_module is None:
        import rnnfast as rnnfast_module
    kwargs = dict(num_layers=case.num_layers, batch_first=True,
                  bidirectional=case.bidirectional, dropout=case.dropout)
    if case.kind == "RNN":
        kwargs["nonlinearity"] = case.nonlinearity
    torch.manual_seed(seed)
    ref = getattr(torch.nn, case.kind)(case.input_size, case.hidden_size, **kwargs)
    fast = getattr(rnnfast_module, case.kind)(case.input_size, case.hidden_size, **kwargs)
    fast.load_state_dict(ref.state_dict())
    ref = ref.to(device=device, dtype=dtype)
    fast = fast.to(device=device, dtype=dtype)
    for m in (ref, fast):
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)
    return ref, fast


class Call(tuple):
    """The arguments of a module call: (input,) or (input, hx)."""


def make_input(case, device, dtype, seed=1):
    """The input of a case's module call: a batch_first tensor, or a Call holding a
    PackedSequence (sorted by length, as pack_padded_sequence gives it) and / or initial states
    (random, as a language model's carried states are)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.seq_len, case.input_size, generator=g)
    x = x.to(device=device, dtype=dtype)  # requires_grad=False, as in training
    if case.packed_lengths is None and not case.initial_state:
        return x
    if case.packed_lengths is not None:
        shortest, longest = case.packed_lengths
        lengths = torch.randint(shortest, longest + 1, (case.batch,), generator=g)
        lengths[0] = longest
        x = torch.nn.utils.rnn.pack_padded_sequence(x[:, :longest], lengths, batch_first=True,
                                                    enforce_sorted=False)
    if not case.initial_state:
        return Call((x,))
    states = (case.num_layers * (2 if case.bidirectional else 1), case.batch, case.hidden_size)
    h0 = torch.randn(states, generator=g).to(device=device, dtype=dtype)
    if case.kind == "LSTM":
        c0 = torch.randn(states, generator=g).to(device=device, dtype=dtype)
        return Call((x, (h0, c0)))
    return Call((x, h0))


def call(module, x):
    """module(x), or module(*x) where x is a Call."""
    return module(*x) if isinstance(x, Call) else module(x)


def output_tensor(output):
    """A module's output as a tensor (a PackedSequence's data)."""
    return output.data if isinstance(output, torch.nn.utils.rnn.PackedSequence) else output


def forward_step(module, x, eval_mode=False):
    """(a) forward pass under torch.no_grad() (in eval mode where eval_mode: no dropout)."""
    def step():
        with torch.no_grad():
            call(module, x)

    def eval_step():
        module.eval()
        try:
            step()
        finally:
            module.train()
    return eval_step if eval_mode else step


def train_step(module, x, zero_grad=True):
    """(b) a training step: zero_grad(set_to_none=True), forward, output.sum().backward()."""
    def step():
        if zero_grad:
            module.zero_grad(set_to_none=True)
        out, _ = call(module, x)
        output_tensor(out).sum().backward()
    return step


def max_abs_diff(ref, fast, x):
    """Largest |torch - rnnfast| over the output and the final states of one forward: a
    check that both sides compute the same thing (not asserted here)."""
    ref.eval(), fast.eval()
    try:
        with torch.no_grad():
            a, b = call(ref, x), call(fast, x)
    finally:
        ref.train(), fast.train()

    def flat(o):
        if isinstance(o, torch.Tensor):
            return [o]
        if isinstance(o, torch.nn.utils.rnn.PackedSequence):
            return [o.data]
        return [t for item in o for t in flat(item)]
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(flat(a), flat(b)))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclass
class TimingConfig:
    warmup_calls: int = 2        # at least this many warm-up calls per side
    warmup_s: float = 0.2        # and keep warming up until this long has passed
    sample_s: float = 0.02       # one sample runs the step n times, n chosen to take this long
    budget_s: float = 5.0        # target time for all the repeats of one measurement
    min_repeats: int = 5
    max_repeats: int = 15
    cap_s: float = 30.0          # but fewer (down to 3) where min_repeats would take longer
    repeats: int = None          # fixed repeat count (--repeats) instead of the adaptive one


def timing_config(device, quick=False, repeats=None):
    if quick:
        cfg = TimingConfig(warmup_calls=1, warmup_s=0.03, sample_s=0.01, budget_s=0.4,
                           min_repeats=3, max_repeats=3, cap_s=5.0)
    elif device == "cuda":
        cfg = TimingConfig(warmup_calls=3, warmup_s=0.1, sample_s=0.01, budget_s=0.8,
                           min_repeats=5, max_repeats=10, cap_s=10.0)
    else:
        cfg = TimingConfig()
    cfg.repeats = repeats
    return cfg


class CpuTimer:
    """Wall clock (time.perf_counter) around n calls."""
    name = "time.perf_counter"

    def sync(self):
        pass

    def thread_round_trip_ns(self):
        """The round trip of a value between ATen's first two threads now, in nanoseconds
        (rnnfast's probe), or None on one thread or without rnnfast's extension. Taken beside
        the samples: on a cloud machine it says whether the threads' cores sat close together or
        far apart while they were measured (see benchmarks/README.md, "Run-to-run spread")."""
        if torch.get_num_threads() < 2:
            return None
        try:
            from rnnfast._ops import _C
        except ImportError:
            return None
        value = _C.thread_round_trip_ns(2000)
        return None if math.isnan(value) else value

    def time(self, fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n


class CudaTimer:
    """CUDA events around n calls, torch.cuda.synchronize() before and after."""
    name = "torch.cuda.Event (synchronized)"

    def sync(self):
        torch.cuda.synchronize()

    def time(self, fn, n):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / n


def timer_for(device):
    return CudaTimer() if device == "cuda" else CpuTimer()


def _warmup(fn, timer, cfg):
    """Warm up fn; returns an estimate of its time per call in seconds."""
    times = []
    t_start = time.perf_counter()
    while (len(times) < cfg.warmup_calls
           or (time.perf_counter() - t_start < cfg.warmup_s and len(times) < 1000)):
        times.append(timer.time(fn, 1))
    last = times[-3:]
    return max(statistics.median(last), 1e-7)


def measure_pair(fn_torch, fn_fast, timer, cfg):
    """Time fn_torch and fn_fast interleaved; every sample is milliseconds per call.

    Both are warmed up first; each sample runs a side n times in a row (n chosen so a sample
    takes about cfg.sample_s, at least 1); per repeat, torch and rnnfast are sampled one after
    the other, and which goes first alternates from repeat to repeat. After each repeat the
    timer's thread_round_trip_ns probe runs where it has one (CpuTimer)."""
    est_t = _warmup(fn_torch, timer, cfg)
    est_f = _warmup(fn_fast, timer, cfg)
    n_t = max(1, int(round(cfg.sample_s / est_t)))
    n_f = max(1, int(round(cfg.sample_s / est_f)))
    if cfg.repeats:
        repeats = cfg.repeats
    else:
        per_repeat = n_t * est_t + n_f * est_f
        repeats = int(cfg.budget_s / per_repeat)
        repeats = min(cfg.max_repeats, max(cfg.min_repeats, repeats))
        if repeats * per_repeat > cfg.cap_s:  # slow steps (or a busy machine): bound the run
            repeats = max(min(3, repeats), int(cfg.cap_s / per_repeat))
    samples_t, samples_f = [], []
    probe = getattr(timer, "thread_round_trip_ns", None)
    round_trips = []
    for r in range(repeats):
        order = ((fn_torch, n_t, samples_t), (fn_fast, n_f, samples_f))
        if r % 2:
            order = order[::-1]
        for fn, n, samples in order:
            samples.append(timer.time(fn, n) * 1000.0)
        value = probe() if probe else None
        if value is not None:
            round_trips.append(value)
    med_t, med_f = statistics.median(samples_t), statistics.median(samples_f)
    return {
        "torch_ms": samples_t,
        "rnnfast_ms": samples_f,
        "torch_median_ms": med_t,
        "rnnfast_median_ms": med_f,
        "speedup": med_t / med_f,
        "torch_min_ms": min(samples_t),
        "rnnfast_min_ms": min(samples_f),
        "calls_per_sample": {"torch": n_t, "rnnfast": n_f},
        "repeats": repeats,
        # per repeat, after its two samples (empty on one thread): CpuTimer.thread_round_trip_ns
        "thread_round_trip_ns": round_trips,
    }


def round_trip_note(row):
    """"  threads 58-366 ns": the least and the most thread round trip probed while a row's
    forward and training step were measured (measure_pair), or "" where none was."""
    values = [v for mode in ("forward", "train")
              for v in (row.get(mode) or {}).get("thread_round_trip_ns", [])]
    return f"  threads {min(values):.0f}-{max(values):.0f} ns" if values else ""


# --------------------------------------------------------------------------------------------
# Peak memory of one training step
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_fds():
    """Silence the C++ profiler's messages (written straight to fds 1 and 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


CPU_MEMORY_METHOD = ("torch.profiler(profile_memory=True): the allocation (+) and free (-) "
                     "events of the step, summed in time order; peak of the running sum")
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), "
                      "minus memory_allocated() at the start of the step")


def peak_train_bytes_cpu(module, x):
    """Peak of live bytes allocated during one training step on CPU (relative to its start).

    tracemalloc does not see torch's allocations; the profiler's memory events do (each
    allocation and free of a CPU tensor's storage, with its size and a timestamp)."""
    from torch.profiler import ProfilerActivity, profile
    module.zero_grad(set_to_none=True)   # outside the profiled region: no frees of old grads
    step = train_step(module, x, zero_grad=False)
    with _quiet_fds():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def peak_train_bytes_cuda(module, x):
    module.zero_grad(set_to_none=True)
    step = train_step(module, x, zero_grad=False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def peak_train_bytes(module, x, device):
    if device == "cuda":
        return peak_train_bytes_cuda(module, x)
    return peak_train_bytes_cpu(module, x)


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------

class WithoutMkldnn(torch.nn.Module):
    """A torch.nn module whose forward runs with torch.backends.mkldnn disabled: on CPU,
    torch.nn.LSTM then takes its aten per-step path instead of oneDNN's fused LSTM (the
    backward follows the forward's choice)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN")
            with torch.backends.mkldnn.flags(enabled=False):
                return self.module(*args)


def run_case(case, device, dtype, cfg, timer=None, rnnfast_module=None, torch_mkldnn=True):
    """Measure one row: forward, training step, peak memory. Errors are recorded, not raised.

    torch_mkldnn=False runs the torch.nn side with oneDNN disabled (see WithoutMkldnn)."""
    timer = timer or timer_for(device)
    row = asdict(case)
    row.update(kind=case.kind, nonlinearity=case.nonlinearity, label=case.label,
               dtype=str(dtype).replace("torch.", ""), error=None)
    try:
        ref, fast = make_pair(case, device, dtype, rnnfast_module=rnnfast_module)
        if not torch_mkldnn:
            ref = WithoutMkldnn(ref)
        x = make_input(case, device, dtype)
        for side, module in (("torch.nn", ref), ("rnnfast", fast)):  # say which side fails
            try:
                train_step(module, x)()
            except Exception as exc:
                raise RuntimeError(f"{side} training step failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        row["max_abs_diff"] = max_abs_diff(ref, fast, x)
        eval_mode = case.training_only_dropout
        row["forward"] = measure_pair(forward_step(ref, x, eval_mode),
                                      forward_step(fast, x, eval_mode), timer, cfg)
        row["train"] = measure_pair(train_step(ref, x), train_step(fast, x), timer, cfg)
        try:  # a failed memory measurement keeps the timings
            mt = peak_train_bytes(ref, x, device)
            mf = peak_train_bytes(fast, x, device)
            row["memory"] = {"torch_peak_bytes": mt, "rnnfast_peak_bytes": mf,
                             "ratio": (mf / mt) if mt > 0 else None, "error": None}
        except Exception as exc:
            row["memory"] = {"torch_peak_bytes": None, "rnnfast_peak_bytes": None,
                             "ratio": None, "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # a measurement: record and go on
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def geomean(values):
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def group_summary(rows):
    ok = [r for r in rows if not r.get("error")]
    return {mode: geomean([r[mode]["speedup"] for r in ok]) for mode in MODES}


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def _speedups(rows, mode):
    return [(r["label"], r[mode]["speedup"]) for r in rows if not r.get("error")]


def _target(name, rows, expected, check, describe):
    """check(rows_ok) -> bool; describe(rows_ok) -> text.  expected = rows the full run has."""
    ok = [r for r in rows if not r.get("error")]
    errors = [r["label"] for r in rows if r.get("error")]
    entry = {"target": name, "rows_measured": len(ok), "rows_expected": expected,
             "complete": len(ok) == expected and not errors, "errors": errors}
    if not ok:
        if errors:
            entry.update(status="NOT MET", detail=f"every row failed: {_listing(errors)}")
        else:
            entry.update(status="N/A", detail="no rows measured")
        return entry
    met = bool(check(ok)) and not errors
    detail = describe(ok)
    if errors:
        detail += f"; {len(errors)} row(s) failed: {', '.join(errors)}"
    if not entry["complete"]:
        detail += f" [partial: {len(ok)} of {expected} rows]"
    entry.update(status="MET" if met else "NOT MET", detail=detail)
    return entry


def _listing(items, limit=8):
    """The first `limit` items (worst first), and how many more."""
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items) - limit} more in the JSON's rows)"
    return text


def _min_target(name, rows, expected, mode, bound):
    def check(ok):
        return all(s >= bound for _, s in _speedups(ok, mode))

    def describe(ok):
        sp = _speedups(ok, mode)
        worst = min(sp, key=lambda t: t[1])
        below = sorted((t for t in sp if t[1] < bound), key=lambda t: t[1])
        text = f"min {worst[1]:.2f}x ({worst[0]}), need >= {bound}x"
        if below:
            text += f"; {len(below)} below: " + _listing([f"{lab} {v:.2f}x" for lab, v in below])
        return text
    return _target(name, rows, expected, check, describe)


def _geomean_target(name, rows, expected, mode, bound):
    def check(ok):
        return geomean([s for _, s in _speedups(ok, mode)]) >= bound

    def describe(ok):
        g = geomean([s for _, s in _speedups(ok, mode)])
        return f"geomean {g:.2f}x over {len(ok)} rows, need >= {bound}x"
    return _target(name, rows, expected, check, describe)


def _memory_target(name, rows, expected):
    # rows whose memory measurement failed count as failed rows here
    rows = [r if r.get("error") or not r["memory"].get("error") else
            {**r, "error": "memory: " + r["memory"]["error"]} for r in rows]

    def check(ok):
        return all(r["memory"]["rnnfast_peak_bytes"] <= r["memory"]["torch_peak_bytes"]
                   for r in ok)

    def describe(ok):
        ratios = [(r["label"], r["memory"]["ratio"]) for r in ok
                  if r["memory"]["ratio"] is not None]
        over = [f"{r['label']} {fmt_bytes(r['memory']['rnnfast_peak_bytes'])} > "
                f"{fmt_bytes(r['memory']['torch_peak_bytes'])}" for r in ok
                if r["memory"]["rnnfast_peak_bytes"] > r["memory"]["torch_peak_bytes"]]
        text = "rnnfast/torch peak ratio: "
        if ratios:
            worst = max(ratios, key=lambda t: t[1])
            text += f"max {worst[1]:.2f} ({worst[0]}), geomean {geomean([v for _, v in ratios]):.2f}"
        text += "; need every ratio <= 1"
        if over:
            text += f"; {len(over)} over: " + _listing(over)
        return text
    return _target(name, rows, expected, check, describe)


def evaluate_targets(device, groups):
    """The project's speed and memory targets, each MET / NOT MET / N/A with its numbers.

    groups: [{"name": "course"|"grid", "dtype": ..., "rows": [...]}, ...].  A target over a
    partial run (--quick, --filter) is evaluated on the rows measured and marked partial."""
    def rows_of(name, dtype=None):
        out = []
        for g in groups:
            if g["name"] == name and (dtype is None or g["dtype"] == dtype):
                out.extend(g["rows"])
        return out

    n_course = len(course_cases())
    n_grid = len(grid_cases(device))
    n_models = len(model_cases())
    dtypes = [g["dtype"] for g in groups]
    targets = []
    if device == "cpu":
        dtype = "float32" if "float32" in dtypes else (dtypes[0] if dtypes else "float32")
        course = rows_of("course", dtype)
        layers = rows_of("grid", dtype) + rows_of("models", dtype)
        n_layers = n_grid + n_models
        n_lstm = len([c for c in grid_cases(device) + model_cases() if c.kind == "LSTM"])
        lstm = [r for r in layers if r["cell"] == "LSTM"]
        others = [r for r in layers if r["cell"] != "LSTM"]
        adding = [r for r in course if r["shape"] == "adding"]
        targets.append(_min_target("cpu: adding (LSTM and Elman) training speedup >= 50x",
                                   adding, 2, "train", 50.0))
        targets.append(_geomean_target("cpu: course shapes, training speedup geomean >= 8x",
                                       course, n_course, "train", 8.0))
        targets.append(_min_target("cpu: every course shape, forward (no_grad) speedup >= 1.5x",
                                   course, n_course, "forward", 1.5))
        for mode in MODES:
            targets.append(_min_target(f"cpu: grid and models, no row below 1.0x ({mode})",
                                       layers, n_layers, mode, 1.0))
            targets.append(_geomean_target(f"cpu: LSTM rows of grid and models, geomean >= 1.5x "
                                           f"({mode})", lstm, n_lstm, mode, 1.5))
            targets.append(_geomean_target(f"cpu: GRU and Elman rows of grid and models, geomean "
                                           f">= 2.5x ({mode})", others, n_layers - n_lstm, mode,
                                           2.5))
        targets.append(_memory_target("cpu: peak training-step memory <= torch's (every row)",
                                      course + layers, n_course + n_layers))
    else:
        course_dtype = "float32" if "float32" in dtypes else (dtypes[0] if dtypes else "float32")
        course = rows_of("course", course_dtype)
        targets.append(_geomean_target(
            f"cuda: course shapes ({course_dtype}), training speedup geomean >= 3x",
            course, n_course, "train", 3.0))
        targets.append(_min_target(
            f"cuda: course shapes ({course_dtype}), no training speedup below 1.5x",
            course, n_course, "train", 1.5))
        for dtype in ("float32", "bfloat16"):
            if dtype not in dtypes:
                continue
            grid = rows_of("grid", dtype)
            for mode in MODES:
                targets.append(_geomean_target(f"cuda: grid ({dtype}), geomean >= 1.0x ({mode})",
                                               grid, n_grid, mode, 1.0))
                targets.append(_min_target(f"cuda: grid ({dtype}), no shape below 0.7x ({mode})",
                                           grid, n_grid, mode, 0.7))
        all_rows = [r for g in groups for r in g["rows"]]
        expected = sum({"course": n_course, "grid": n_grid, "models": n_models}[g["name"]]
                       for g in groups)
        targets.append(_memory_target("cuda: peak training-step memory <= torch's (every row)",
                                      all_rows, expected))
    return targets


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------

def _cpuinfo_field(name):
    """The first processor's `name` field in /proc/cpuinfo (None where it has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model():
    """The CPU's name, and its family and model numbers where /proc/cpuinfo gives them: a
    virtual machine's name is often generic ("AMD EPYC"), while the numbers tell a Zen 3 EPYC
    (family 25, model 1) from a Zen 4 one (family 25, model 17)."""
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    if family and model:
        name += f" (family {family}, model {model})"
    return name


def cpu_vendor():
    """GenuineIntel, AuthenticAMD, ... (None where /proc/cpuinfo does not say)."""
    return _cpuinfo_field("vendor_id")


def _run(cmd, cwd=None):
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except Exception:
        return ""


def git_info():
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT) or None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {"commit": commit, "dirty": bool(status) if commit else None}


def load_average():
    """1, 5 and 15-minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device, argv=None):
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + list(argv or sys.argv)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_vendor": cpu_vendor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "git": git_info(),
        "load_average_start": load_average(),
    }
    try:
        import rnnfast
        env["rnnfast_version"] = getattr(rnnfast, "__version__", None)
        env["rnnfast_path"] = os.path.dirname(rnnfast.__file__)
        env["rnnfast_cpu_capability"] = rnnfast.cpu_capability()
        try:
            from rnnfast import _built_from
            env["rnnfast_source_hash"] = getattr(_built_from, "SOURCE_HASH", None)
        except Exception:
            pass
    except Exception as exc:
        env["rnnfast_version"] = None
        env["rnnfast_import_error"] = f"{type(exc).__name__}: {exc}"
    if device == "cuda" and torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name()
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cudnn_version"] = torch.backends.cudnn.version()
        env["gpu_driver"] = _run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"]).splitlines()[:1] or None
        if env["gpu_driver"]:
            env["gpu_driver"] = env["gpu_driver"][0]
        env["tf32"] = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                       "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return env


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def fmt_bytes(n):
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ms(v):
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def markdown_table(group):
    rows = group["rows"]
    lines = [
        f"### {group['name']} ({group['dtype']})",
        "",
        "| shape | cell | (B, T, in, hid, L) | fwd torch ms | fwd rnnfast ms | fwd speedup "
        "| train torch ms | train rnnfast ms | train speedup | peak torch | peak rnnfast "
        "| peak ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        mark = ""
        if r.get("note"):
            notes.append(r["note"])
            mark = "*" * len(notes)
        if r.get("error"):
            lines.append(f"| {r['shape']}{mark} | {r['cell']} | ({r['batch']}, {r['seq_len']}, "
                         f"{r['input_size']}, {r['hidden_size']}, {r['num_layers']}) | "
                         f"error: {r['error'][:160]} |" + " |" * 8)
            continue
        f, t, m = r["forward"], r["train"], r["memory"]
        ratio = f"{m['ratio']:.2f}" if m["ratio"] is not None else "-"
        lines.append(
            f"| {r['shape']}{mark} | {r['cell']} | ({r['batch']}, {r['seq_len']}, "
            f"{r['input_size']}, {r['hidden_size']}, {r['num_layers']}) "
            f"| {_ms(f['torch_median_ms'])} | {_ms(f['rnnfast_median_ms'])} | "
            f"{f['speedup']:.2f}x | {_ms(t['torch_median_ms'])} | {_ms(t['rnnfast_median_ms'])} "
            f"| {t['speedup']:.2f}x | {fmt_bytes(m['torch_peak_bytes'])} | "
            f"{fmt_bytes(m['rnnfast_peak_bytes'])} | {ratio} |")
    gm = group.get("geomean") or group_summary(rows)

    def g(v):
        return f"**{v:.2f}x**" if v else "-"
    lines.append(f"| **geomean** | | | | | {g(gm['forward'])} | | | {g(gm['train'])} | | | |")
    for i, note in enumerate(notes, 1):
        lines.append("")
        lines.append(f"{'*' * i} {note}")
    return "\n".join(lines)


def markdown_tables(groups):
    return "\n\n".join(markdown_table(g) for g in groups)


def format_targets(targets):
    width = max((len(t["target"]) for t in targets), default=0)
    return "\n".join(f"{t['status']:>7}  {t['target']:<{width}}  {t['detail']}" for t in targets)


def plot_speedups(groups, path, title=""):
    """Bar chart of the speedups (log scale): one pair of bars (forward, train) per row,
    one panel per group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [g for g in groups if any(not r.get("error") for r in g["rows"])]
    if not panels:
        panels = groups
    widest = max((len(g["rows"]) for g in panels), default=1)
    fig_w = max(8.0, 0.32 * widest + 2)
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(fig_w, 4.2 * max(1, len(panels))),
                             squeeze=False)
    for ax, g in zip(axes[:, 0], panels):
        rows = [r for r in g["rows"] if not r.get("error")]
        labels = [f"{r['shape']} {r['cell']}" for r in rows]
        xs = range(len(rows))
        w = 0.4
        fwd = [r["forward"]["speedup"] for r in rows]
        trn = [r["train"]["speedup"] for r in rows]
        ax.bar([x - w / 2 for x in xs], fwd, w, label="forward (no_grad)", color="#4c72b0")
        ax.bar([x + w / 2 for x in xs], trn, w, label="training step", color="#dd8452")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_ylabel("speedup (torch / rnnfast)")
        gm = g.get("geomean") or group_summary(g["rows"])
        gm_text = ", ".join(f"{m} {gm[m]:.2f}x" for m in MODES if gm.get(m))
        ax.set_title(f"{g['name']} ({g['dtype']}): geomean {gm_text}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
