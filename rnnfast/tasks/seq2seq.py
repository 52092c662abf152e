"""seq2seq: an encoder-decoder with attention, decoded greedily and with beam search.

The guide (section 3.4) describes sequence-to-sequence models with attention and
beam search without data; this task makes its own small "translation": a string
of 3-8 random digits -> the same digits sorted ascending, then EOS.  Sorting needs
attention (which digit comes next depends on the whole source) and its output is
fully determined, so exact-match accuracy is meaningful.

Model: Embedding(13, 32) -> encoder ``rnnfast.GRU(32, 128)``; decoder
Embedding(13, 32) -> ``rnnfast.GRU(32, 128)`` started from the encoder's final
state, Luong ("general") attention over the encoder outputs, then
Linear(256 -> 128) tanh -> Linear(13).  Sources are padded at the front to 8 tokens
(so the encoder's last step is a real digit, and a string sees the same padding
alone as in a batch); the attention ignores the padding.
Teacher forcing, cross-entropy, Adam lr 3e-3, batch 128, 10000 training pairs,
8 epochs; 1000 test pairs.

Decoding runs the decoder GRU one step per call with its state carried.  Greedy:
the arg-max token each step.  Beam search (width 5): keeps the 5 best partial
outputs by total log-probability, moves those ending in EOS to a finished list,
and stops when no open hypothesis can beat the best finished one.  Metrics: exact
sequence accuracy of both.

Quick mode: 2000 training pairs, 200 test pairs, 3 epochs.
"""

import numpy as np
import torch
from torch import nn

import rnnfast
from rnnfast.data import synthetic as syn

from .common import Metric, Result

TITLE = "encoder-decoder with attention: greedy vs beam search"
SOURCE = "004 3.4"
DEFAULT_SEED = 0
EMB, HID, BEAM = 32, 128, 5
MIN_DIGITS, MAX_DIGITS = 3, 8


class Seq2Seq(nn.Module):
    def __init__(self, n_tokens=syn.N_TOKENS, emb=EMB, hidden=HID):
        super().__init__()
        self.src_emb = nn.Embedding(n_tokens, emb, padding_idx=syn.PAD)
        self.tgt_emb = nn.Embedding(n_tokens, emb, padding_idx=syn.PAD)
        self.encoder = rnnfast.GRU(emb, hidden, batch_first=True)
        self.decoder = rnnfast.GRU(emb, hidden, batch_first=True)
        self.attn = nn.Linear(hidden, hidden, bias=False)
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, n_tokens)

    def encode(self, src):                       # src (B, S), padded at the front
        enc, h = self.encoder(self.src_emb(src))
        return enc, h, src == syn.PAD

    def decode(self, tgt_in, h, enc, mask):      # tgt_in (B, T); returns logits (B, T, V), h
        dec, h = self.decoder(self.tgt_emb(tgt_in), h)
        scores = torch.bmm(self.attn(dec), enc.transpose(1, 2))      # (B, T, S)
        scores = scores.masked_fill(mask[:, None, :], float("-inf"))
        context = torch.bmm(torch.softmax(scores, dim=-1), enc)     # (B, T, H)
        return self.out(torch.tanh(self.combine(torch.cat([dec, context], -1)))), h

    def forward(self, src, tgt_in):
        enc, h, mask = self.encode(src)
        return self.decode(tgt_in, h, enc, mask)[0]


def make_batch(pairs, device, width=MAX_DIGITS):
    """Sources padded at the front to a fixed width (the encoder then sees the same
    amount of padding whether a string is decoded alone or in a batch)."""
    srcs = [s for s, _ in pairs]
    width = max([width] + [len(s) for s in srcs])
    src = np.full((len(srcs), width), syn.PAD, dtype=np.int64)
    for i, s in enumerate(srcs):
        src[i, width - len(s):] = s                                   # front padding
    tgt_in, _ = syn.pad_batch([[syn.SOS] + t[:-1] for _, t in pairs])
    tgt_out, _ = syn.pad_batch([t for _, t in pairs])
    as_t = lambda a: torch.as_tensor(a, device=device)
    return as_t(src), as_t(tgt_in), as_t(tgt_out)


@torch.no_grad()
def greedy(model, src, max_len):
    """Batch greedy decoding; returns one token list per source (without EOS)."""
    enc, h, mask = model.encode(src)
    tok = torch.full((len(src), 1), syn.SOS, dtype=torch.long, device=src.device)
    outs = [[] for _ in range(len(src))]
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits, h = model.decode(tok, h, enc, mask)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for i in torch.nonzero(~done).flatten().tolist():
            t = int(tok[i])
            if t == syn.EOS:
                done[i] = True
            else:
                outs[i].append(t)
        if bool(done.all()):
            break
    return outs


@torch.no_grad()
def beam_search(model, src_row, max_len, width=BEAM):
    """Beam search for one source (1, S); returns the best token list (without EOS)."""
    enc, states, mask = model.encode(src_row)
    beams = [([], 0.0)]                   # open hypotheses: (tokens, log-probability)
    finished = []
    for _ in range(max_len):
        n = len(beams)
        last = torch.tensor([[b[0][-1] if b[0] else syn.SOS] for b in beams],
                            device=src_row.device)
        logits, states = model.decode(last, states, enc.expand(n, -1, -1), mask.expand(n, -1))
        logp = torch.log_softmax(logits[:, -1], -1).cpu().double()
        total = torch.tensor([b[1] for b in beams], dtype=torch.float64)[:, None] + logp
        top = torch.topk(total.flatten(), min(width, total.numel()))
        new_beams, parents = [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            parent, tok = divmod(flat, total.shape[1])
            if tok == syn.EOS:
                finished.append((beams[parent][0], score))
            elif tok not in (syn.PAD, syn.SOS):
                new_beams.append((beams[parent][0] + [tok], score))
                parents.append(parent)
        # log-probabilities only fall as tokens are added: once the best finished
        # hypothesis beats every open one, nothing can overtake it
        best_done = max((sc for _, sc in finished), default=-float("inf"))
        kept = [i for i, (_, sc) in enumerate(new_beams) if sc > best_done]
        if not kept:
            break
        beams = [new_beams[i] for i in kept]
        states = states[:, [parents[i] for i in kept], :]
    pool = finished or beams
    return max(pool, key=lambda f: f[1])[0]


def run(ctx):
    n_train = ctx.pick(10000, 2000)
    n_test = ctx.pick(1000, 200)
    epochs = ctx.epochs(8, quick=3)
    train_pairs = syn.digit_sort_pairs(ctx.rng, n_train, MIN_DIGITS, MAX_DIGITS)
    test_pairs = syn.digit_sort_pairs(ctx.rng, n_test, MIN_DIGITS, MAX_DIGITS)
    max_len = MAX_DIGITS + 2

    model = Seq2Seq().to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=syn.PAD)
    batch = 128
    history = []
    n_batches = (n_train + batch - 1) // batch
    bar = ctx.progress(epochs * n_batches, "GRU encoder-decoder", unit="batch")
    for ep in range(epochs):
        model.train()
        order = ctx.rng.permutation(n_train)
        total = 0.0
        for i in range(0, n_train, batch):
            src, tgt_in, tgt_out = make_batch([train_pairs[j] for j in order[i:i + batch]],
                                              ctx.device)
            opt.zero_grad()
            logits = model(src, tgt_in)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item()
            bar.set_postfix(epoch=ep + 1, loss=f"{loss.item():.4f}")
            bar.update()
        history.append(total / n_batches)
    bar.close()

    model.eval()
    truth = [t[:-1] for _, t in test_pairs]
    greedy_out = []
    for i in range(0, n_test, 256):
        src, _, _ = make_batch(test_pairs[i:i + 256], ctx.device)
        greedy_out += greedy(model, src, max_len)
    beam_out = []
    bar = ctx.progress(n_test, f"beam search (width {BEAM})", unit="seq")
    for pair in test_pairs:
        src, _, _ = make_batch([pair], ctx.device)
        beam_out.append(beam_search(model, src, max_len))
        bar.update()
    bar.close()
    acc_g = float(np.mean([g == t for g, t in zip(greedy_out, truth)]))
    acc_b = float(np.mean([b == t for b, t in zip(beam_out, truth)]))
    by_len = {}
    for (s, _), g, b, t in zip(test_pairs, greedy_out, beam_out, truth):
        d = by_len.setdefault(len(s), [0, 0, 0])
        d[0] += 1
        d[1] += g == t
        d[2] += b == t
    lengths = sorted(by_len)

    fig, axes = ctx.figure(1, 2, figsize=(10, 4))
    axes[0].plot(np.arange(1, epochs + 1), history, "o-")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training cross-entropy")
    axes[0].set_title("training")
    w = 0.38
    xs = np.arange(len(lengths))
    axes[1].bar(xs - w / 2, [by_len[n][1] / by_len[n][0] for n in lengths], w, label="greedy")
    axes[1].bar(xs + w / 2, [by_len[n][2] / by_len[n][0] for n in lengths], w,
                label=f"beam ({BEAM})")
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(lengths)
    axes[1].set_xlabel("source length (digits)")
    axes[1].set_ylabel("exact-match accuracy")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title(f"test: greedy {acc_g:.3f}, beam {acc_b:.3f}")
    axes[1].legend(loc="lower left")
    ctx.savefig(fig, "accuracy")

    examples = [{"source": syn.tokens_to_text(s), "target": syn.tokens_to_text(t),
                 "greedy": syn.tokens_to_text(g), "beam": syn.tokens_to_text(b)}
                for (s, t), g, b in list(zip(test_pairs, greedy_out, beam_out))[:10]]
    return Result(
        models=[f"Embedding + rnnfast.GRU(32, {HID}) encoder, rnnfast.GRU(32, {HID}) decoder "
                "with Luong attention"],
        metrics=[Metric("GRU enc-dec + attention", "greedy accuracy", acc_g),
                 Metric("GRU enc-dec + attention", f"beam-{BEAM} accuracy", acc_b)],
        summary=f"sorting digit strings: exact-match accuracy greedy {acc_g:.4f}, "
                f"beam search (width {BEAM}) {acc_b:.4f} on {n_test} test strings",
        reference="the guide gives no figure; beam search should be at least as good as greedy",
        details={"task": "sort 3-8 digits ascending", "n_train": n_train, "n_test": n_test,
                 "history": history, "examples": examples,
                 "accuracy_by_length": {str(n): {"count": by_len[n][0],
                                                 "greedy": by_len[n][1] / by_len[n][0],
                                                 "beam": by_len[n][2] / by_len[n][0]}
                                        for n in lengths}},
        epochs=epochs,
    )
