"""Fashion-MNIST readers: IDX files (``.gz`` or not) and the CSV form.

The IDX set is the one Zalando Research publishes::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

The CSV form (e.g. Kaggle's ``fashion-mnist_train.csv``/``fashion-mnist_test.csv``)
has one image per row: the label, then 784 pixel values 0-255, with or without a
header row.  A single CSV file (such as a 1000-row sample) is split into a
training part and a held-out part.
"""

import csv
import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np

from ._errors import DataError, open_text

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

WHERE = ("get the IDX files from https://github.com/zalandoresearch/fashion-mnist "
         "(data/fashion) or the CSV files from "
         "https://www.kaggle.com/datasets/zalando-research/fashionmnist")

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CSV_PAIR = ("fashion-mnist_train.csv", "fashion-mnist_test.csv")
SUBFOLDERS = ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "fashion")

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
              0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Split:
    """Images as uint8 arrays (N, 28, 28), labels as int64 arrays (N,)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    held_out: str  # how the test part was chosen


def read_idx(path):
    """Read one IDX file (gzip-compressed or not) into a numpy array."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found", "an IDX file", WHERE)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(path, f"broken gzip data ({err})", "a gzip-compressed IDX file", WHERE)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(path, "not an IDX file (bad magic number)",
                        "an IDX file starting with 0x00 0x00 <type> <ndim>", WHERE)
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(path, "truncated IDX header", "an IDX file", WHERE)
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(shape)) if ndim else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(path, f"IDX payload has {len(raw) - header} bytes, the header "
                        f"announces shape {tuple(shape)}", "a complete IDX file", WHERE)
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("=") if dtype.byteorder == ">" else dtype)


def read_csv(path):
    """Read the CSV form: label then 784 pixels per row, optional header."""
    path = os.fspath(path)
    expected = "a CSV file with one image per row: label (0-9), then 784 pixel values 0-255"
    labels, pixels = [], []
    with open_text(path, expected, WHERE) as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and not row[0].strip().lstrip("-").isdigit():
                continue  # header
            if len(row) != 785:
                raise DataError(path, f"row {lineno} has {len(row)} fields", expected, WHERE)
            try:
                values = [int(float(c)) for c in row]
            except ValueError:
                raise DataError(path, f"row {lineno} has a non-numeric field", expected, WHERE)
            labels.append(values[0])
            pixels.append(values[1:])
    if not labels:
        raise DataError(path, "no image rows found", expected, WHERE)
    y = np.asarray(labels, dtype=np.int64)
    x = np.asarray(pixels, dtype=np.int64)
    if y.min() < 0 or y.max() > 9 or x.min() < 0 or x.max() > 255:
        raise DataError(path, "labels outside 0-9 or pixels outside 0-255", expected, WHERE)
    return x.astype(np.uint8).reshape(-1, 28, 28), y


def _find(folder, name):
    for ext in ("", ".gz"):
        for sep_name in (name, name.replace("-idx", ".idx")):
            p = os.path.join(folder, sep_name + ext)
            if os.path.isfile(p):
                return p
    return None


def _check_pair(images, labels, ipath, lpath):
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(ipath, f"images have shape {images.shape}", "N x 28 x 28 images", WHERE)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(lpath, f"{labels.shape[0] if labels.ndim else 0} labels for "
                        f"{images.shape[0]} images in {ipath}", "one label per image", WHERE)
    return images.astype(np.uint8), labels.astype(np.int64)


def holdout(x, y, test_fraction=0.2):
    """Split one labelled set: the last ``test_fraction`` of rows are held out."""
    n_test = max(1, int(round(len(y) * test_fraction)))
    return x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:]


def find(path):
    """What ``load`` would read under ``path``: ('idx', {...}), ('csv-pair', (train, test)),
    ('csv', file) or None."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.lower().endswith((".csv", ".csv.gz", ".txt")):
            return ("csv", path)
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        return None
    for sub in SUBFOLDERS:
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        files = {k: _find(folder, v) for k, v in IDX_NAMES.items()}
        if all(files.values()):
            return ("idx", files)
        pair = [os.path.join(folder, n) for n in CSV_PAIR]
        if all(os.path.isfile(p) for p in pair):
            return ("csv-pair", tuple(pair))
    for sub in SUBFOLDERS:
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            low = name.lower()
            if low.startswith(("fashion-mnist", "fashion_mnist")) and low.endswith(".csv"):
                return ("csv", os.path.join(folder, name))
    return None


def load(path, test_fraction=0.2):
    """Load Fashion-MNIST from a folder (IDX set or CSV pair or one CSV) or one CSV file.

    Returns a :class:`Split`.  The standard sets keep their own train/test split;
    a single CSV holds out its last ``test_fraction`` of rows.
    """
    found = find(path)
    if found is None:
        raise DataError(path, "no Fashion-MNIST data found" if os.path.exists(path) else "no such file or folder",
                        "the four IDX files " + ", ".join(v + "[.gz]" for v in IDX_NAMES.values())
                        + f", or {CSV_PAIR[0]} and {CSV_PAIR[1]}, or one CSV file "
                        "(label + 784 pixels per row)", WHERE)
    kind, where = found
    if kind == "idx":
        xtr, ytr = _check_pair(read_idx(where["train_images"]), read_idx(where["train_labels"]),
                               where["train_images"], where["train_labels"])
        xte, yte = _check_pair(read_idx(where["test_images"]), read_idx(where["test_labels"]),
                               where["test_images"], where["test_labels"])
        return Split(xtr, ytr, xte, yte, os.path.dirname(where["train_images"]), "t10k files")
    if kind == "csv-pair":
        xtr, ytr = read_csv(where[0])
        xte, yte = read_csv(where[1])
        return Split(xtr, ytr, xte, yte, os.path.dirname(where[0]), "test CSV file")
    x, y = read_csv(where)
    if len(y) < 2:
        raise DataError(where, "fewer than 2 images", "at least 2 rows to hold one out", WHERE)
    xtr, ytr, xte, yte = holdout(x, y, test_fraction)
    return Split(xtr, ytr, xte, yte, where, f"last {len(yte)} of {len(y)} rows")
