"""IMDB sentiment readers, a tokenizer and a Keras-style vocabulary.

Accepted sources:

- the ``aclImdb`` folder tree of the Large Movie Review Dataset
  (``aclImdb/{train,test}/{pos,neg}/*.txt``), the full 25k/25k split;
- a labelled CSV (``.csv``) with a header ``label,text[,is_valid]`` (labels
  ``negative/positive``, ``neg/pos`` or ``0/1``; texts may contain quoted newlines);
  rows with a true ``is_valid`` form the test part, otherwise the last 20% of rows;
- a ``text<TAB>label`` file (``.txt``/``.tsv``) without header (UCI "Sentiment Labelled Sentences",
  e.g. ``imdb_labelled.txt``); its last 20% of rows are held out.
"""

import csv
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ._errors import DataError, open_text

WHERE = ("get the full data set from https://ai.stanford.edu/~amaas/data/sentiment/ "
         "(aclImdb_v1.tar.gz, unpack it to aclImdb/) or the 1000-sentence file from "
         "https://archive.ics.uci.edu/dataset/331/sentiment+labelled+sentences")

POSITIVE = {"1", "pos", "positive", "true", "yes"}
NEGATIVE = {"0", "neg", "negative", "false", "no"}

# Files looked for, in this order, in a data folder.
DEFAULT_FILES = ("imdb_labelled.txt", "imdb_sample_texts.csv", "IMDB Dataset.csv", "imdb.csv")

PAD, START, OOV = 0, 1, 2
FIRST_WORD_INDEX = 3  # as keras.datasets.imdb: 0 pad, 1 start, 2 out-of-vocabulary


@dataclass
class Split:
    train_texts: list
    train_labels: np.ndarray  # int64 0/1
    test_texts: list
    test_labels: np.ndarray
    source: str
    held_out: str


def _label(value, path, lineno, expected):
    v = value.strip().lower()
    if v in POSITIVE:
        return 1
    if v in NEGATIVE:
        return 0
    raise DataError(path, f"row {lineno} has the label {value!r}", expected, WHERE)


def _holdout(texts, labels, test_fraction):
    n_test = max(1, int(round(len(texts) * test_fraction)))
    return texts[:-n_test], labels[:-n_test], texts[-n_test:], labels[-n_test:]


def _split(path, texts, labels, valid, test_fraction):
    labels = np.asarray(labels, dtype=np.int64)
    if valid is not None and any(valid) and not all(valid):
        tr = [i for i, v in enumerate(valid) if not v]
        te = [i for i, v in enumerate(valid) if v]
        return Split([texts[i] for i in tr], labels[tr], [texts[i] for i in te], labels[te],
                     path, f"{len(te)} rows marked is_valid")
    if len(texts) < 2:
        raise DataError(path, "fewer than 2 labelled texts", "at least 2 rows", WHERE)
    a, b, c, d = _holdout(texts, labels, test_fraction)
    return Split(a, b, c, d, path, f"last {len(c)} of {len(texts)} rows")


def read_csv(path, test_fraction=0.2):
    """A labelled CSV with a header naming ``label`` (or ``sentiment``) and ``text``
    (or ``review``) columns, optionally ``is_valid``."""
    path = os.fspath(path)
    expected = ("a CSV file with a header label,text[,is_valid] "
                "(label negative/positive or 0/1)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open_text(path, expected, WHERE) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(path, "the file is empty", expected, WHERE)
        cols = [h.strip().lower() for h in header]
        try:
            li = cols.index("label") if "label" in cols else cols.index("sentiment")
            ti = cols.index("text") if "text" in cols else cols.index("review")
        except ValueError:
            raise DataError(path, f"header {header!r} lacks a label or text column", expected, WHERE)
        vi = cols.index("is_valid") if "is_valid" in cols else None
        texts, labels, valid = [], [], []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(li, ti, vi or 0):
                raise DataError(path, f"record {lineno} has {len(row)} fields", expected, WHERE)
            texts.append(row[ti])
            labels.append(_label(row[li], path, lineno, expected))
            if vi is not None:
                valid.append(row[vi].strip().lower() in ("true", "1", "yes"))
    if not texts:
        raise DataError(path, "no labelled rows found", expected, WHERE)
    return _split(path, texts, labels, valid if vi is not None else None, test_fraction)


def read_tsv(path, test_fraction=0.2):
    """``text<TAB>label`` lines, no header (label 0/1)."""
    path = os.fspath(path)
    expected = "one review per line: text, a TAB, then the label 0 or 1"
    texts, labels = [], []
    with open_text(path, expected, WHERE) as f:
        # split on line ends only: str.splitlines would also split on U+0085 etc.
        lines = f.read().replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise DataError(path, f"line {lineno} has no TAB", expected, WHERE)
            texts.append(text.strip())
            labels.append(_label(label, path, lineno, expected))
    if not texts:
        raise DataError(path, "no labelled lines found", expected, WHERE)
    return _split(path, texts, labels, None, test_fraction)


def read_aclimdb(root):
    """The ``aclImdb`` tree: train/ and test/, each with pos/ and neg/ text files."""
    root = os.fspath(root)
    texts = {}
    for part in ("train", "test"):
        items = []
        for label, sub in ((0, "neg"), (1, "pos")):
            folder = os.path.join(root, part, sub)
            if not os.path.isdir(folder):
                raise DataError(folder, "folder not found",
                                "the aclImdb tree with train/pos, train/neg, test/pos, test/neg",
                                WHERE)
            for name in sorted(os.listdir(folder)):
                if name.endswith(".txt"):
                    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                        items.append((f.read(), label))
        if not items:
            raise DataError(os.path.join(root, part), "no review files found",
                            "*.txt files under pos/ and neg/", WHERE)
        # interleave deterministically so that a prefix is not all one class
        rng = np.random.default_rng(0)
        order = rng.permutation(len(items))
        texts[part] = [items[i] for i in order]
    return Split([t for t, _ in texts["train"]], np.array([l for _, l in texts["train"]], np.int64),
                 [t for t, _ in texts["test"]], np.array([l for _, l in texts["test"]], np.int64),
                 root, "aclImdb test/ folder")


def _is_acl(folder):
    return all(os.path.isdir(os.path.join(folder, p, s))
               for p in ("train", "test") for s in ("pos", "neg"))


def find(path):
    """The source ``load`` would read under ``path`` (a folder or a file), or None."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        return None
    for cand in (os.path.join(path, "aclImdb"), path):
        if _is_acl(cand):
            return cand
    for name in DEFAULT_FILES:
        p = os.path.join(path, name)
        if os.path.isfile(p):
            return p
    return None


def load(path, test_fraction=0.2):
    """Load labelled reviews from an aclImdb folder, a labelled CSV or a TSV file."""
    src = find(path)
    if src is None:
        raise DataError(path, "no IMDB data found" if os.path.exists(path) else "no such file or folder",
                        "an aclImdb/ folder, or one of " + ", ".join(DEFAULT_FILES), WHERE)
    if os.path.isdir(src):
        return read_aclimdb(src)
    low = src.lower()
    if low.endswith((".txt", ".tsv")):
        return read_tsv(src, test_fraction)
    if low.endswith(".csv"):
        return read_csv(src, test_fraction)
    with open(src, "r", encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline()
    if "\t" in first and not first.lower().startswith(("label,", "text,", "sentiment,", "review,")):
        return read_tsv(src, test_fraction)
    return read_csv(src, test_fraction)


_TAG = re.compile(r"<[^>]+>")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text):
    """Lower-case words; HTML tags (``<br />``) and punctuation dropped."""
    return _WORD.findall(_TAG.sub(" ", text.lower()))


class Vocabulary:
    """Word -> index with keras.datasets.imdb's conventions: 0 padding, 1 start,
    2 out-of-vocabulary, words ranked by frequency from 3 on; ``num_words`` caps
    the indices (words ranked beyond it become 2)."""

    def __init__(self, texts, num_words=20000):
        counts = Counter(w for t in texts for w in tokenize(t))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        self.num_words = num_words
        self.index = {w: i + FIRST_WORD_INDEX for i, w in enumerate(ranked)
                      if i + FIRST_WORD_INDEX < num_words}

    def __len__(self):
        return len(self.index) + FIRST_WORD_INDEX

    def encode(self, text):
        return [START] + [self.index.get(w, OOV) for w in tokenize(text)]


def pad_sequences(seqs, maxlen):
    """Keras' defaults: pad and truncate at the front (keep the last ``maxlen``)."""
    out = np.zeros((len(seqs), maxlen), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-maxlen:]
        if s:
            out[i, -len(s):] = s
    return out
