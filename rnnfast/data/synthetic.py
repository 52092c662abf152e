"""Generators for the course tasks' self-made data (all take a numpy Generator)."""

import numpy as np

# --------------------------------------------------------------------------
# dynamic adding problem
# --------------------------------------------------------------------------


def adding_sequence(rng, n_steps):
    """One sequence of the dynamic adding problem.

    Per step two inputs: a value uniform in [-1, 1] and a marker from {-1, 0, 1}
    with probabilities 0.25, 0.25, 0.5.  At a step with marker 1 the target is that
    value plus the value at the previous marker-1 step (0 until two markers were
    seen); at every other step it is 0.  Returns x (n_steps, 2), t (n_steps, 1),
    float32.
    """
    value = rng.uniform(-1.0, 1.0, size=n_steps)
    marker = rng.choice([-1.0, 0.0, 1.0], size=n_steps, p=[0.25, 0.25, 0.5])
    target = np.zeros(n_steps)
    marked = np.flatnonzero(marker == 1.0)
    if len(marked) > 1:
        target[marked[1:]] = value[marked[1:]] + value[marked[:-1]]
    x = np.stack([value, marker], axis=1).astype(np.float32)
    return x, target[:, None].astype(np.float32)


def adding_set(rng, n_sequences=9, n_steps=3000):
    """``n_sequences`` independent sequences: x (N, T, 2), t (N, T, 1)."""
    xs, ts = zip(*(adding_sequence(rng, n_steps) for _ in range(n_sequences)))
    return np.stack(xs), np.stack(ts)


# --------------------------------------------------------------------------
# noisy sine
# --------------------------------------------------------------------------


def noisy_sine(rng, n=1000, freq=0.02, noise=2.0):
    """x_t = sin(freq t) + noise * U(0, 1), t = 0 .. n-1."""
    t = np.arange(n)
    return np.sin(freq * t) + noise * rng.random(n)


def sliding_windows(values, step, pad=True):
    """(values[i:i+step], values[i+step]) pairs.  With ``pad`` the series is first
    extended by ``step`` copies of its last value, so there is one window per
    original point (the lecture's convention)."""
    values = np.asarray(values, dtype=np.float64)
    if pad:
        values = np.concatenate([values, np.repeat(values[-1], step)])
    n = len(values) - step
    x = np.stack([values[i:i + step] for i in range(n)])
    return x, values[step:]


# --------------------------------------------------------------------------
# many-body ground-state energies (the lecture's extrapolation example)
# --------------------------------------------------------------------------

# X = 2, 4, ..., 40 and the energies y_tot listed in the lecture notes.
ENERGY_X = np.arange(2, 42, 2, dtype=np.float64)
ENERGY_Y = np.array([
    -0.03077640549, -0.08336233266, -0.1446729567, -0.2116753732, -0.2830637392,
    -0.3581341341, -0.436462435, -0.5177783846, -0.6019067271, -0.6887363571,
    -0.7782028952, -0.8702784034, -0.9649652536, -1.062292565, -1.16231451,
    -1.265109911, -1.370782966, -1.479465113, -1.591317992, -1.70653767])


def sequence_pairs(values, length=2):
    """(values[i:i+length], values[i+length]) for every i: x (N, length, 1), y (N, 1)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values) - length
    x = np.stack([values[i:i + length] for i in range(n)])[:, :, None]
    return x, values[length:, None]


# --------------------------------------------------------------------------
# sentence memorisation
# --------------------------------------------------------------------------

SENTENCE = "*Der Cottbuser Postkutscher putzt den Cottbuser Postkutschkasten."


def char_vocabulary(text):
    """Sorted list of the distinct characters of ``text``."""
    return sorted(set(text))


def next_char_pairs(text, vocab):
    """Indices of the input characters and of their targets, the next character
    (the last character's target wraps around to the first)."""
    idx = np.array([vocab.index(c) for c in text], dtype=np.int64)
    return idx, np.roll(idx, -1)


# --------------------------------------------------------------------------
# seq2seq toy translation: sort a digit string
# --------------------------------------------------------------------------

PAD, SOS, EOS = 0, 1, 2
DIGIT0 = 3  # token of digit d is DIGIT0 + d
N_TOKENS = DIGIT0 + 10


def digit_sort_pairs(rng, n, min_len=3, max_len=8):
    """``n`` (source, target) token lists: a random digit string and the same
    digits sorted ascending, followed by EOS."""
    pairs = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        digits = rng.integers(0, 10, size=length)
        src = [DIGIT0 + int(d) for d in digits]
        tgt = [DIGIT0 + int(d) for d in np.sort(digits)] + [EOS]
        pairs.append((src, tgt))
    return pairs


def tokens_to_text(tokens):
    return "".join(str(t - DIGIT0) for t in tokens if t >= DIGIT0)


def pad_batch(seqs, pad=PAD):
    """Right-pad lists of tokens into an int64 array (N, max_len) and their lengths."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    out = np.full((len(seqs), int(lengths.max())), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out, lengths
