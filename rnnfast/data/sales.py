"""FRED-style monthly series: a CSV with a header ``DATE,<SERIES>`` and one
``YYYY-MM-DD,value`` row per month (FRED writes ``.`` for a missing value)."""

import csv
import datetime as _dt
import os
from dataclasses import dataclass

import numpy as np

from ._errors import DataError, open_text

DEFAULT_FILE = "RSCCASN.csv"
WHERE = ("download it from https://fred.stlouisfed.org/series/RSCCASN "
         "(Download > CSV), a file with the header DATE,RSCCASN")
EXPECTED = "a CSV file with a header DATE,<SERIES> and rows YYYY-MM-DD,<number>"


@dataclass
class Series:
    dates: list          # datetime.date, one per row
    values: np.ndarray   # float64
    name: str            # the value column's header
    source: str


def _date(text):
    text = text.strip()
    for fmt in ("%Y-%m-%d", "%Y-%m", "%m/%d/%Y", "%Y/%m/%d"):
        try:
            return _dt.datetime.strptime(text, fmt).date()
        except ValueError:
            pass
    raise ValueError(text)


def read_fred_csv(path, hint=WHERE):
    """Read a FRED CSV (CRLF or LF endings, final newline or not)."""
    path = os.fspath(path)
    dates, values = [], []
    with open_text(path, EXPECTED, hint) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise DataError(path, "missing header row", EXPECTED, hint)
        if header[0].strip().lower() not in ("date", "observation_date", "month"):
            raise DataError(path, f"first column is {header[0]!r}, not DATE", EXPECTED, hint)
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 2:
                raise DataError(path, f"row {lineno} has {len(row)} field(s)", EXPECTED, hint)
            try:
                d = _date(row[0])
            except ValueError:
                raise DataError(path, f"row {lineno}: {row[0]!r} is not a date", EXPECTED, hint)
            v = row[1].strip()
            if v in (".", ""):
                raise DataError(path, f"row {lineno} ({row[0]}) has no value",
                                "a complete series without gaps", hint)
            try:
                values.append(float(v))
            except ValueError:
                raise DataError(path, f"row {lineno}: {v!r} is not a number", EXPECTED, hint)
            dates.append(d)
    if len(values) < 2:
        raise DataError(path, "fewer than 2 data rows", EXPECTED, hint)
    return Series(dates, np.asarray(values, dtype=np.float64), header[1].strip(), path)


def find(path, name=DEFAULT_FILE):
    """``path`` itself if it is a file, else ``path/name`` if present, else None."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    p = os.path.join(path, name)
    return p if os.path.isfile(p) else None


def load(path, name=DEFAULT_FILE):
    """Load the series from a file, or from ``name`` inside a folder."""
    src = find(path, name)
    if src is None:
        path = os.fspath(path)
        if os.path.isdir(path):
            raise DataError(os.path.join(path, name), "file not found", EXPECTED, WHERE)
        raise DataError(path, "no such file or folder",
                        f"{name} or a folder containing it ({EXPECTED})", WHERE)
    return read_fred_csv(src)


def add_months(d, n):
    """The first of the month ``n`` months after date ``d``."""
    m = d.month - 1 + n
    return _dt.date(d.year + m // 12, m % 12 + 1, 1)


def windows(values, length):
    """All (values[i:i+length], values[i+length]) pairs, as arrays (N, length), (N,)."""
    values = np.asarray(values)
    n = len(values) - length
    if n <= 0:
        return np.zeros((0, length)), np.zeros((0,))
    x = np.stack([values[i:i + length] for i in range(n)])
    return x, values[length:]


class MinMaxScaler:
    """Scale to [0, 1] with the minimum and maximum of the data it was fitted on."""

    def fit(self, values):
        values = np.asarray(values, dtype=np.float64)
        self.min_, self.max_ = float(values.min()), float(values.max())
        self.scale_ = (self.max_ - self.min_) or 1.0
        return self

    def transform(self, values):
        return (np.asarray(values, dtype=np.float64) - self.min_) / self.scale_

    def inverse_transform(self, values):
        return np.asarray(values, dtype=np.float64) * self.scale_ + self.min_
