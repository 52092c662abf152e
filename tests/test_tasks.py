"""The course tasks (python -m rnnfast.tasks) and their data loaders.

Every task runs once in --quick mode on the CPU; a few spec checks run in full
mode where that takes seconds.  The loaders are tested on the real samples in
../shared/data (relative to the project root) when that folder exists, and on
small files written here.
"""

import gzip
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnfast import tasks
from rnnfast.data import DataError
from rnnfast.data import fashion_mnist, imdb, sales, synthetic

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NEEDS = {  # task -> sample file it reads from the shared data folder
    "fashion-mnist": "fashion-mnist_1000rows.csv",
    "imdb": "imdb_labelled.txt",
    "sales": "RSCCASN.csv",
}


def shared(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the real data samples live in ../shared/data "
                    "beside the project root")
    return path


def run_cli(args, out):
    rc = tasks.main(list(args) + ["--out", str(out), "--device", "cpu", "--no-progress"])
    return rc


def load_result(out):
    path = Path(out) / "result.json"
    assert path.is_file(), f"no result.json in {out}"
    return json.loads(path.read_text())


def check_result(doc, name, quick):
    assert doc["task"] == name
    assert doc["quick"] is quick
    assert doc["device"] == "cpu"
    for key in ("models", "metrics", "wall_time_s", "rnnfast_version", "torch_version",
                "seed", "epochs", "reference"):
        assert key in doc, key
    assert doc["models"] and doc["metrics"]
    numeric = [m["value"] for m in doc["metrics"] if isinstance(m["value"], (int, float))]
    assert numeric, "no numeric metric"
    for m in doc["metrics"]:
        if isinstance(m["value"], (int, float)):
            assert math.isfinite(m["value"]), m
    assert doc["plots"], "no plots"


# ---------------------------------------------------------------------------
# every task, quick
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_task_quick(name, tmp_path):
    args = [name, "--quick"]
    if name in NEEDS:
        args += ["--data", str(shared(NEEDS[name]))]
    out = tmp_path / name
    assert run_cli(args, out) == 0
    doc = load_result(out)
    check_result(doc, name, quick=True)
    for plot in doc["plots"]:
        p = out / plot
        assert p.is_file() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_rnn_exact_values(tmp_path, capsys):
    assert run_cli(["tiny-rnn"], tmp_path) == 0
    printed = capsys.readouterr().out
    assert "h_2 = -0.707225" in printed
    assert "y_2 = 0.495058" in printed
    values = load_result(tmp_path)["values"]
    assert values["RNN(sigmoid)/h_2"] == pytest.approx(-0.7072252802268861, abs=1e-6)
    assert values["RNN(sigmoid)/y_2"] == pytest.approx(0.4950576961588203, abs=1e-6)


@pytest.mark.cuda
def test_tiny_rnn_cuda():
    from rnnfast.tasks import tiny_rnn
    h, y = tiny_rnn.compute(torch.device("cuda"), torch.float32)
    assert h[2] == pytest.approx(-0.7072252802268861, abs=1e-5)
    assert y[2] == pytest.approx(0.4950576961588203, abs=1e-5)


# ---------------------------------------------------------------------------
# full-mode spec checks that take seconds
# ---------------------------------------------------------------------------


def test_memorize_full_reproduces_sentence(tmp_path):
    assert run_cli(["memorize"], tmp_path) == 0
    doc = load_result(tmp_path)
    assert doc["details"]["solved"]
    assert doc["details"]["generated"] == synthetic.SENTENCE
    assert isinstance(doc["values"]["2 x GRU(50)/epochs to reproduce"], int)


def test_adding_full_lstm_below_elman(tmp_path):
    assert run_cli(["adding"], tmp_path) == 0
    v = load_result(tmp_path)["values"]
    assert v["LSTM/test MSE"] < v["Elman/test MSE"]
    assert v["predict 0/test MSE"] > 0.25


def test_imdb_labelled_sentences_above_60_percent(tmp_path):
    assert run_cli(["imdb", "--data", str(shared("imdb_labelled.txt"))], tmp_path) == 0
    doc = load_result(tmp_path)
    assert doc["values"]["Elman(5, relu)/test accuracy"] >= 0.6


def test_fashion_mnist_sample_above_chance(tmp_path):
    assert run_cli(["fashion-mnist", "--data", str(shared("fashion-mnist_1000rows.csv"))],
                   tmp_path) == 0
    doc = load_result(tmp_path)
    assert doc["values"]["LSTM(30)/test accuracy"] > 0.25  # chance is 0.1


def test_sales_reports_rmse_in_sales_units(tmp_path):
    assert run_cli(["sales", "--quick", "--data", str(shared("RSCCASN.csv"))], tmp_path) == 0
    doc = load_result(tmp_path)
    rmse = doc["values"]["LSTM(100, relu)/held-out RMSE"]
    assert 10 < rmse < 20000  # millions of USD, not the scaled units
    assert len(doc["details"]["future_forecast"]) == 24


# ---------------------------------------------------------------------------
# CLI behaviour
# ---------------------------------------------------------------------------


def test_list(capsys):
    assert tasks.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in tasks.TASKS:
        assert name in out


def test_unknown_task(capsys):
    assert tasks.main(["nope"]) != 0
    assert "unknown task" in capsys.readouterr().err


def test_missing_data_message(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    rc = run_cli(["sales", "--data", str(missing)], tmp_path / "out")
    assert rc != 0
    err = capsys.readouterr().err
    assert "RSCCASN.csv" in err and "fred.stlouisfed.org" in err
    assert "Traceback" not in err


def test_malformed_data_message(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("DATE,RSCCASN\r\n1992-01-01,6938\r\n1992-02-01,lots")
    assert run_cli(["sales", "--data", str(bad)], tmp_path / "out") != 0
    err = capsys.readouterr().err
    assert "bad.csv" in err and "'lots' is not a number" in err


def test_missing_data_subprocess(tmp_path):
    """The real command: non-zero exit status, a message naming the file, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "rnnfast.tasks", "fashion-mnist", "--data",
         str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte" in proc.stderr and "fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_progress_bars_in_a_log(tmp_path):
    """stderr to a file or pipe (CI, `> log 2>&1`): no bar redraws, only the outcome."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "rnnfast.tasks", "sine", "--quick", "--out", str(tmp_path / "out"),
         "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[sine]" in proc.stdout
    assert "\r" not in proc.stderr and "epoch/s" not in proc.stderr, proc.stderr[:500]


def test_progress_bar_drawn_on_a_terminal(tmp_path, monkeypatch):
    from rnnfast.tasks.common import Context

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = Context("sine", tmp_path, device="cpu").progress(3, "Elman")
    assert not bar.disable
    bar.update(3)
    bar.close()
    assert "sine: Elman" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert Context("sine", tmp_path, device="cpu").progress(3, "Elman").disable


def test_missing_task_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert run_cli(["tiny-rnn"], tmp_path / "out") == tasks.EXIT_FAILED
    err = capsys.readouterr().err
    assert "rnnfast[tasks]" in err and "matplotlib" in err and "tqdm" not in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_all_skips_tasks_without_data(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    # run only two tasks to keep this quick: one without data, one needing it
    monkeypatch.setattr(tasks, "TASKS", {k: tasks.TASKS[k] for k in ("tiny-rnn", "sales")})
    rc = run_cli(["all", "--quick", "--data", str(empty)], tmp_path / "all")
    assert rc == 0
    captured = capsys.readouterr()
    assert "[sales] skipped" in captured.err
    assert "| task" in captured.out and "skipped" in captured.out
    assert (tmp_path / "all" / "tiny-rnn" / "result.json").is_file()
    assert (tmp_path / "all" / "table.md").is_file()


def test_default_data_dir(monkeypatch, tmp_path):
    from rnnfast.tasks.common import default_data_dir
    monkeypatch.setenv("RNNFAST_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("RNNFAST_DATA")
    expected = ROOT.parent / "shared" / "data"
    assert default_data_dir() == (expected if expected.is_dir() else Path("data"))


# ---------------------------------------------------------------------------
# loaders on the real samples
# ---------------------------------------------------------------------------


def test_fashion_mnist_csv_sample():
    split = fashion_mnist.load(shared("fashion-mnist_1000rows.csv"))
    assert split.x_train.shape == (800, 28, 28) and split.x_test.shape == (200, 28, 28)
    assert split.x_train.dtype == np.uint8
    assert set(np.unique(np.concatenate([split.y_train, split.y_test]))) <= set(range(10))
    # the folder finds the sample too
    assert fashion_mnist.find(SHARED)[0] == "csv"


def test_imdb_labelled_sentences():
    split = imdb.load(shared("imdb_labelled.txt"))
    # 1000 lines although some texts contain U+0085 (NEL), which is not a line end here
    assert len(split.train_texts) + len(split.test_texts) == 1000
    assert set(split.train_labels.tolist()) == {0, 1}
    assert not any("\t" in t for t in split.train_texts)


def test_imdb_sample_csv_quoted_newlines():
    split = imdb.load(shared("imdb_sample_texts.csv"))
    assert len(split.train_texts) == 800 and len(split.test_texts) == 200
    assert split.held_out.startswith("200 rows marked is_valid")
    assert set(split.train_labels.tolist()) == {0, 1}
    # (quoted newlines inside a text are covered by test_imdb_formats)


def test_sales_rsccasn():
    s = sales.load(shared("RSCCASN.csv"))
    assert len(s.values) == 334 and s.name == "RSCCASN"
    assert str(s.dates[0]) == "1992-01-01" and str(s.dates[-1]) == "2019-10-01"
    assert sales.load(SHARED).source.endswith("RSCCASN.csv")


# ---------------------------------------------------------------------------
# loaders on files written here (formats not in the samples)
# ---------------------------------------------------------------------------


def _idx(path, array, compress):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    raw = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim)
    raw += struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    if compress:
        raw = gzip.compress(raw)
        path = Path(str(path) + ".gz")
    path.write_bytes(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("t10k", 4)):
        _idx(tmp_path / f"{part}-images-idx3-ubyte",
             rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), compress)
        _idx(tmp_path / f"{part}-labels-idx1-ubyte",
             rng.integers(0, 10, n).astype(np.uint8), compress)
    split = fashion_mnist.load(tmp_path)
    assert split.x_train.shape == (6, 28, 28) and split.y_test.shape == (4,)
    assert split.y_train.dtype == np.int64


def test_fashion_mnist_bad_files(tmp_path):
    (tmp_path / "fashion-mnist_x.csv").write_text("label,p1\r\n3,4")
    with pytest.raises(DataError, match="row 2 has 2 fields"):
        fashion_mnist.load(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        fashion_mnist.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Fashion-MNIST data found.*train-images-idx3-ubyte"):
        fashion_mnist.load(tmp_path / "empty")


def test_imdb_formats(tmp_path):
    tsv = tmp_path / "s.txt"
    tsv.write_bytes(b"good film\t1\r\nbad film\t0\r\nfine\t1")  # CRLF, no final newline
    s = imdb.load(tsv)
    assert s.train_texts + s.test_texts == ["good film", "bad film", "fine"]
    assert s.train_labels.tolist() + s.test_labels.tolist() == [1, 0, 1]

    csv_path = tmp_path / "r.csv"
    csv_path.write_bytes(b'label,text\r\npositive,"two\r\nlines"\r\nnegative,meh\r\n'
                         b'positive,ok\r\nnegative,"a ""quoted"" word"')
    s = imdb.load(csv_path)
    assert s.train_texts[0] == "two\r\nlines" and s.test_texts == ['a "quoted" word']

    for part in ("train", "test"):
        for label, sub in ((0, "neg"), (1, "pos")):
            d = tmp_path / "aclImdb" / part / sub
            d.mkdir(parents=True)
            (d / "0_1.txt").write_text(f"{sub} review<br />text")
    s = imdb.load(tmp_path)
    assert len(s.train_texts) == 2 and sorted(s.test_labels.tolist()) == [0, 1]

    bad = tmp_path / "bad.txt"
    bad.write_text("no tab here\n")
    with pytest.raises(DataError, match="no TAB"):
        imdb.load(bad)


def test_imdb_vocabulary():
    v = imdb.Vocabulary(["a a a b b c"], num_words=5)
    assert v.encode("a b c d") == [imdb.START, 3, 4, imdb.OOV, imdb.OOV]
    padded = imdb.pad_sequences([[5, 6, 7], [1]], maxlen=2)
    assert padded.tolist() == [[6, 7], [0, 1]]
    assert imdb.tokenize("It's <br />GREAT, isn't it?") == ["it's", "great", "isn't", "it"]


def test_sales_crlf_and_missing_value(tmp_path):
    f = tmp_path / "x.csv"
    f.write_bytes(b"DATE,X\r\n2000-01-01,1.5\r\n2000-02-01,2")
    s = sales.read_fred_csv(f)
    assert s.values.tolist() == [1.5, 2.0] and s.name == "X"
    f.write_bytes(b"DATE,X\n2000-01-01,1.5\n2000-02-01,.\n")
    with pytest.raises(DataError, match="no value"):
        sales.read_fred_csv(f)


def test_generators():
    rng = np.random.default_rng(1)
    x, t = synthetic.adding_set(rng, 2, 500)
    assert x.shape == (2, 500, 2) and t.shape == (2, 500, 1)
    marks = np.flatnonzero(x[0, :, 1] == 1)
    assert t[0, marks[1], 0] == pytest.approx(x[0, marks[0], 0] + x[0, marks[1], 0])
    assert np.all(t[0, x[0, :, 1] != 1] == 0)
    xs, ys = synthetic.sliding_windows(np.arange(10.0), 4)
    assert xs.shape == (10, 4) and ys[0] == 4
    pairs = synthetic.digit_sort_pairs(rng, 5)
    for src, tgt in pairs:
        assert tgt[:-1] == sorted(src) and tgt[-1] == synthetic.EOS
