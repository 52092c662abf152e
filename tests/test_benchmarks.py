"""The benchmark tool (benchmarks/run.py): a smoke run of --quick on CPU, checked for the
structure of its JSON and the plot, and unit checks of the harness in benchmarks/bench_lib.py.
No speed assertions: the timings depend on the machine."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)
# The scripts run with benchmarks/ as their path entry; PYTHONPATH makes them import the rnnfast
# of this checkout, as the tests do, rather than whichever one is installed.
CHECKOUT_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))

import bench_lib  # noqa: E402
import floor  # noqa: E402


def _positive_finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "quick.json", out / "quick.png"
    proc = subprocess.run(
        # --threads 1: on a busy machine (the test suite runs beside other work) two
        # OpenMP threads make the steps many times slower and the smoke test minutes long
        [sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--device", "cpu",
         "--threads", "1", "--json", str(json_path), "--plot", str(png_path)],
        cwd=ROOT, env=CHECKOUT_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(json_path) as f:
        data = json.load(f)
    return proc, data, png_path


def test_quick_run_output(quick_run):
    proc, data, _ = quick_run
    assert "| shape | cell |" in proc.stdout
    assert "geomean" in proc.stdout
    assert "## Targets" in proc.stdout
    assert ("MET" in proc.stdout) or ("N/A" in proc.stdout)


def test_quick_run_json_structure(quick_run):
    _, data, png_path = quick_run
    assert data["schema"] == bench_lib.SCHEMA
    env = data["environment"]
    for key in ("cpu_model", "torch_threads", "torch_version", "rnnfast_version", "git",
                "date_utc", "command"):
        assert key in env, key
    assert env["torch_threads"] >= 1
    assert set(env["git"]) == {"commit", "dirty"}
    assert "--quick" in env["command"]
    assert data["settings"]["device"] == "cpu"
    assert data["settings"]["dtypes"] == ["float32"]
    assert data["settings"]["threads"] == env["torch_threads"] == 1

    groups = {(g["name"], g["dtype"]) for g in data["groups"]}
    assert groups == {("course", "float32"), ("grid", "float32"), ("models", "float32")}
    n_rows = 0
    for g in data["groups"]:
        assert g["rows"]
        for mode in bench_lib.MODES:
            assert _positive_finite(g["geomean"][mode])
        for r in g["rows"]:
            n_rows += 1
            assert r["error"] is None, r["error"]
            assert r["label"] == f"{g['name']}/{r['shape']}/{r['cell']}"
            assert r["max_abs_diff"] < 1e-3  # identical weights: same outputs
            for mode in bench_lib.MODES:
                m = r[mode]
                assert len(m["torch_ms"]) == len(m["rnnfast_ms"]) == m["repeats"] >= 1
                assert all(_positive_finite(v) for v in m["torch_ms"] + m["rnnfast_ms"])
                for key in ("torch_median_ms", "rnnfast_median_ms", "speedup"):
                    assert _positive_finite(m[key]), (r["label"], mode, key)
                assert math.isclose(m["speedup"], m["torch_median_ms"] / m["rnnfast_median_ms"])
            mem = r["memory"]
            assert _positive_finite(mem["torch_peak_bytes"])
            assert _positive_finite(mem["rnnfast_peak_bytes"])
            assert math.isclose(mem["ratio"], mem["rnnfast_peak_bytes"] / mem["torch_peak_bytes"])
    assert 5 <= n_rows <= 13  # "a handful of course shapes, 2 grid shapes and a model"

    assert data["targets"]
    for t in data["targets"]:
        assert t["status"] in ("MET", "NOT MET", "N/A")
        assert t["target"] and isinstance(t["detail"], str)
    assert any(t["target"].startswith("cpu: adding") for t in data["targets"])

    assert data["plot"] == str(png_path)
    assert png_path.exists() and png_path.stat().st_size > 1000
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs (steady on a busy machine), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_case_lists():
    course = [c for c in bench_lib.cases("cpu") if c.group == "course"]
    assert len(course) == 11
    assert len([c for c in bench_lib.cases("cpu") if c.group == "grid"]) == 27
    assert len([c for c in bench_lib.cases("cuda") if c.group == "grid"]) == 96
    models = [c for c in bench_lib.cases("cpu") if c.group == "models"]
    assert len(models) == 8
    assert {c.cell for c in models} == {"LSTM", "GRU", "Elman"}
    sine = [c for c in course if c.shape == "sine"][0]
    assert (sine.kind, sine.nonlinearity) == ("RNN", "relu")
    assert [c.label for c in bench_lib.cases("cpu", filter_text="ADDING")] == [
        "course/adding/LSTM", "course/adding/Elman"]


def test_harness_on_torch_nn_both_sides(one_thread):
    """torch.nn standing in for rnnfast: identical weights give identical outputs, and the
    timings and memory figures come out positive."""
    case = bench_lib.Case("grid", "tiny", "GRU", 4, 10, 8, 16, 2)
    ref, other = bench_lib.make_pair(case, "cpu", torch.float32, rnnfast_module=torch.nn)
    x = bench_lib.make_input(case, "cpu", torch.float32)
    assert not x.requires_grad
    assert all(p.requires_grad for p in other.parameters())
    assert bench_lib.max_abs_diff(ref, other, x) == 0.0
    cfg = bench_lib.TimingConfig(warmup_calls=1, warmup_s=0.0, sample_s=0.001, repeats=4)
    res = bench_lib.measure_pair(bench_lib.train_step(ref, x), bench_lib.train_step(other, x),
                                 bench_lib.CpuTimer(), cfg)
    assert len(res["torch_ms"]) == len(res["rnnfast_ms"]) == 4
    assert _positive_finite(res["speedup"])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two threads need two CPUs to meet")
def test_thread_round_trip_probe_beside_the_samples():
    """The probe times round trips between two of ATen's threads (more than nothing, far less
    than the millisecond of a thread waiting for a CPU), gives NaN where ATen runs one thread,
    and measure_pair takes it after every repeat on two threads."""
    from rnnfast._ops import _C
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        value = _C.thread_round_trip_ns(1000)
        assert 0.0 < value < 1e6
        assert math.isnan(_C.thread_round_trip_ns(0))
        case = bench_lib.Case("grid", "tiny", "GRU", 4, 10, 8, 16, 1)
        ref, other = bench_lib.make_pair(case, "cpu", torch.float32, rnnfast_module=torch.nn)
        x = bench_lib.make_input(case, "cpu", torch.float32)
        cfg = bench_lib.TimingConfig(warmup_calls=1, warmup_s=0.0, sample_s=0.001, repeats=3)
        res = bench_lib.measure_pair(bench_lib.train_step(ref, x),
                                     bench_lib.train_step(other, x), bench_lib.CpuTimer(), cfg)
        assert len(res["thread_round_trip_ns"]) == 3
        assert all(0.0 < v < 1e6 for v in res["thread_round_trip_ns"])
        assert bench_lib.round_trip_note({"train": res}).startswith("  threads ")
        torch.set_num_threads(1)
        assert math.isnan(_C.thread_round_trip_ns(1000))
        assert bench_lib.CpuTimer().thread_round_trip_ns() is None
    finally:
        torch.set_num_threads(before)


def test_cpu_peak_memory_is_sensible_on_torch_nn(one_thread):
    """The profiler-based CPU peak counts what a training step must hold at least: the output
    and the parameter gradients it creates."""
    case = bench_lib.Case("grid", "mem", "LSTM", 16, 50, 64, 128, 1)
    ref, _ = bench_lib.make_pair(case, "cpu", torch.float32, rnnfast_module=torch.nn)
    x = bench_lib.make_input(case, "cpu", torch.float32)
    peak = bench_lib.peak_train_bytes_cpu(ref, x)
    out_bytes = 16 * 50 * 128 * 4
    grad_bytes = sum(p.numel() * 4 for p in ref.parameters())
    assert peak >= out_bytes + grad_bytes
    assert peak < 200 * 2**20
    # reproducible
    assert abs(bench_lib.peak_train_bytes_cpu(ref, x) - peak) <= 0.05 * peak


def test_targets_report_partial_and_status():
    def row(label_shape, cell, fwd, train, mt=100, mf=50):
        return {"shape": label_shape, "cell": cell, "label": f"course/{label_shape}/{cell}",
                "error": None, "forward": {"speedup": fwd}, "train": {"speedup": train},
                "memory": {"torch_peak_bytes": mt, "rnnfast_peak_bytes": mf,
                           "ratio": mf / mt}}
    groups = [{"name": "course", "dtype": "float32",
               "rows": [row("adding", "LSTM", 10.0, 60.0), row("adding", "Elman", 9.0, 40.0)]}]
    targets = {t["target"]: t for t in bench_lib.evaluate_targets("cpu", groups)}
    adding = targets["cpu: adding (LSTM and Elman) training speedup >= 50x"]
    assert adding["status"] == "NOT MET" and adding["complete"]
    assert "40.00x" in adding["detail"]
    course_min = targets["cpu: every course shape, forward (no_grad) speedup >= 1.5x"]
    assert course_min["status"] == "MET" and not course_min["complete"]
    assert targets["cpu: LSTM rows of grid and models, geomean >= 1.5x (train)"]["status"] == "N/A"


@pytest.mark.parametrize("kind, kwargs", [("LSTM", dict(num_layers=2, bidirectional=True)),
                                          ("LSTM", dict(proj_size=3)),
                                          ("GRU", dict(bias=False)),
                                          ("RNN", dict(nonlinearity="relu"))])
def test_floor_stand_in_has_the_layers_parameters_and_output(kind, kwargs):
    """benchmarks/floor.py's stand-in: torch.nn's parameters (names, shapes, values), an output of
    the layer's shape, and a gradient of each parameter's shape after a training step."""
    reference = getattr(torch.nn, kind)(5, 7, batch_first=True, **kwargs)
    stand_in = floor.WithoutWork(reference)
    named = dict(stand_in.named_parameters())
    assert list(named) == [name for name, _ in reference.named_parameters()]
    for name, parameter in reference.named_parameters():
        assert torch.equal(named[name], parameter)
    x = torch.randn(3, 4, 5)
    expected_output, _ = reference(x)
    bench_lib.train_step(stand_in, x)()
    output, _ = stand_in(x)
    assert output.shape == expected_output.shape
    for name, parameter in named.items():
        assert parameter.grad is not None and parameter.grad.shape == parameter.shape, name


def test_floor_quick_run(tmp_path):
    json_path = tmp_path / "floor.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "floor.py"), "--quick", "--threads", "1",
         "--filter", "course/sine", "--json", str(json_path)],
        cwd=ROOT, env=CHECKOUT_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| sine | Elman-relu |" in proc.stdout
    with open(json_path) as f:
        data = json.load(f)
    [row] = data["rows"]
    assert row["label"] == "course/sine/Elman-relu"
    for side in ("floor", "rnnfast"):
        assert len(row[side]["torch_ms"]) == len(row[side]["rnnfast_ms"]) == row[side]["repeats"]
    assert math.isclose(row["ceiling"], row["floor"]["speedup"])
    assert math.isclose(row["speedup"], row["rnnfast"]["speedup"])
    assert _positive_finite(row["ceiling"]) and _positive_finite(row["speedup"])


def test_options_quick_run(tmp_path):
    # Runs the cell options' benchmark on one row per cell: it first checks that its Python loop
    # computes the fused layer's model (same masks, float64), then times both.
    json_path = tmp_path / "options.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "options.py"), "--quick", "--threads", "1",
         "--filter", "zoneout/B16-T100-H64", "--json", str(json_path)],
        cwd=ROOT, env=CHECKOUT_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(json_path) as f:
        data = json.load(f)
    assert [(row["cell"], row["feature"]) for row in data["rows"]] == [
        ("LSTM", "zoneout"), ("GRU", "zoneout")]
    for row in data["rows"]:
        for key in ("plain_ms", "option_ms", "loop_ms", "cost", "speedup_over_loop",
                    "speedup_ceiling"):
            assert _positive_finite(row[key])
    assert data["environment"]["cpu_model"]
    assert _positive_finite(data["environment"]["gemm_rate_gflops"])


def test_options_training_step_flops():
    # The products of a 16-row, 100-step LSTM training step of 64 units (input 64, no input
    # gradient): forward [1600, 64] x [64, 256] twice, backward the same three times.
    import options

    assert options.training_step_flops("LSTM", 16, 100, 64) == 5 * 2 * 1600 * 64 * 256
    assert options.training_step_flops("GRU", 16, 100, 64) == 5 * 2 * 1600 * 64 * 192


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("feature", ["layer_norm", "zoneout", "recurrent_dropout",
                                     "input_dropout"])
def test_options_loop_computes_the_fused_model(cell, feature):
    import options

    torch.manual_seed(0)
    fused = getattr(__import__("rnnfast"), cell)(6, 6, **options.FEATURES[feature])
    options.check_same_model(fused, options.LoopModel(fused), torch.randn(4, 3, 6))


@pytest.mark.parametrize("cell, batch, size", [
    ("Elman", 1, 256), ("GRU", 1, 256), ("LSTM", 1, 256),
    ("Elman", 16, 512), ("GRU", 16, 256), ("LSTM", 16, 256)])
def test_bfloat16_training_step_peaks_within_torch_nn_memory(cell, batch, size):
    """Rows of the benchmark's bfloat16 grid whose per-step products run in float where the CPU
    has no bfloat16 instructions. One batch row: on the tiled kernel's copy of W_hh^T, converted
    from W_hh as it is copied, with no float copy of W_hh beside it (which made the Elman
    layer's peak 1.09x torch.nn's). 16 rows: MKL's packed copy of W_hh^T, several times its
    size, only where its bytes are at most twice those of the bfloat16 outputs (weighed against
    their floats, it made these rows' peaks 1.21-1.24x torch.nn's on a Zen 3 EPYC)."""
    case = bench_lib.Case("grid", f"B{batch}-T100-H{size}", cell, batch, 100, size, size, 1)
    ref, fast = bench_lib.make_pair(case, "cpu", torch.bfloat16)
    x = bench_lib.make_input(case, "cpu", torch.bfloat16)
    ours = bench_lib.peak_train_bytes_cpu(fast, x)
    theirs = bench_lib.peak_train_bytes_cpu(ref, x)
    assert ours <= theirs, (ours, theirs)


def test_one_step_bfloat16_training_step_peaks_within_torch_nn_memory():
    """The course's sine model (one step of 32 Elman units from a zero state) in bfloat16: its
    forward and backward make no float copy of W_hh for a product that never runs, and the
    scan of the first step's gate gradients for a NaN or an Inf makes no temporaries (with
    both, its training step peaked at 1.33x torch.nn's memory)."""
    case = next(c for c in bench_lib.course_cases() if c.shape == "sine")
    ref, fast = bench_lib.make_pair(case, "cpu", torch.bfloat16)
    x = bench_lib.make_input(case, "cpu", torch.bfloat16)
    ours = bench_lib.peak_train_bytes_cpu(fast, x)
    theirs = bench_lib.peak_train_bytes_cpu(ref, x)
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("cell, batch, steps, size, layers, lengths, dtype", [
    ("GRU", 64, 10, 128, 2, (3, 10), torch.float32),  # a seq2seq encoder's sentences, smaller
    ("GRU", 16, 50, 128, 3, (25, 50), torch.float32),
    ("LSTM", 16, 50, 128, 3, (25, 50), torch.float32),  # a speech stack's utterances, smaller
    ("GRU", 64, 10, 500, 2, (3, 10), torch.bfloat16),  # the benchmark's seq2seq encoder
    ("GRU", 16, 50, 128, 3, (25, 50), torch.bfloat16),
    ("LSTM", 16, 50, 128, 3, (25, 50), torch.bfloat16),
], ids=["seq2seq-GRU", "speech-GRU", "speech-LSTM", "seq2seq-GRU-bfloat16",
        "speech-GRU-bfloat16", "speech-LSTM-bfloat16"])
def test_packed_bidirectional_training_peaks_within_torch_nn_memory(cell, batch, steps, size,
                                                                    layers, lengths, dtype):
    """A training step of a bidirectional stack on a packed sequence holds at most torch.nn's
    memory at its peak: the workspaces keep the active rows only, the inner layers' nodes save
    views of the concatenated outputs, and the gate gradients take the place of the
    workspace. In bfloat16 the weight gradients over the packed rows are one product where
    that takes less memory than a double total of the products of chunks of rows."""
    case = bench_lib.Case("models", "packed", cell, batch, steps, size, size, layers,
                          bidirectional=True, packed_lengths=lengths)
    ref, fast = bench_lib.make_pair(case, "cpu", dtype)
    x = bench_lib.make_input(case, "cpu", dtype)
    ours = bench_lib.peak_train_bytes_cpu(fast, x)
    theirs = bench_lib.peak_train_bytes_cpu(ref, x)
    assert ours <= theirs, (ours, theirs)
