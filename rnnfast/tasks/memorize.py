"""memorize: learn a sentence one character at a time, then recite it.

"*Der Cottbuser Postkutscher putzt den Cottbuser Postkutschkasten." as one
sequence of one-hot characters; the target at each step is the next character
(the last one's target wraps around to '*').  Model: 2 x ``rnnfast.GRU(50)`` +
a per-step Linear softmax; Adam (lr 1e-3), batch 1, so one epoch is one
optimiser step on the whole sentence.

Keras' default initialisation, as in the notebook (see ``common.keras_init``);
with torch's default initialisation instead it takes about three times as many
epochs.

Generation is stateful, as with Keras' ``stateful=True`` prediction model: the
same weights, one character per call, the hidden state carried from call to call.
Starting from '*', the greedy (arg-max) character of each call is fed back in.
Training goes on until that generation reproduces the whole sentence (checked
every few epochs), up to a cap of 3000 epochs (``--epochs`` sets the cap).

Quick mode: a cap of 60 epochs (not enough to solve it; the test only checks
the plumbing).
"""

import numpy as np
import torch
from torch import nn

import rnnfast
from rnnfast.data import synthetic

from .common import Metric, Result, keras_init

TITLE = "memorising a sentence with a stacked GRU"
SOURCE = "003"
DEFAULT_SEED = 0
CHECK_EVERY = 10


class CharGRU(nn.Module):
    def __init__(self, n_chars, hidden=50):
        super().__init__()
        self.n_chars = n_chars
        self.gru = rnnfast.GRU(n_chars, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, n_chars)
        keras_init(self)  # the notebook's Keras model, Keras' default initialisation

    def forward(self, x, h=None):      # x: (batch, steps, n_chars) one-hot
        y, h = self.gru(x, h)
        return self.out(y), h          # logits per step, state


class StatefulGenerator:
    """One character per call; keeps the GRU state between calls."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.reset_states()

    def reset_states(self):
        self.h = None

    @torch.no_grad()
    def predict(self, char_index):
        x = torch.zeros(1, 1, self.model.n_chars, device=self.device)
        x[0, 0, char_index] = 1.0
        logits, self.h = self.model(x, self.h)
        return torch.softmax(logits[0, 0], dim=0)


def generate(model, device, vocab, start, n):
    gen = StatefulGenerator(model, device)
    gen.reset_states()
    idx, out = vocab.index(start), []
    for _ in range(n):
        idx = int(gen.predict(idx).argmax())
        out.append(vocab[idx])
    return "".join(out)


def run(ctx):
    text = synthetic.SENTENCE
    vocab = synthetic.char_vocabulary(text)
    cap = ctx.epochs(3000, quick=60)
    src, tgt = synthetic.next_char_pairs(text, vocab)
    x = torch.zeros(1, len(text), len(vocab), device=ctx.device)
    x[0, torch.arange(len(text), device=ctx.device), ctx.tensor(src, torch.long)] = 1.0
    y = ctx.tensor(tgt, torch.long)
    goal = text[1:] + text[0]  # what generation from '*' must produce

    model = CharGRU(len(vocab)).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    losses, progress_log = [], []
    solved_at, generated = None, ""
    bar = ctx.progress(cap, "2 x GRU(50)")
    for epoch in range(1, cap + 1):
        model.train()
        opt.zero_grad()
        logits, _ = model(x)
        loss = loss_fn(logits[0], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update()
        if epoch % CHECK_EVERY == 0 or epoch == cap:
            model.eval()
            generated = generate(model, ctx.device, vocab, text[0], len(text))
            correct = sum(a == b for a, b in zip(generated, goal))
            progress_log.append((epoch, correct, generated))
            if generated == goal:
                solved_at = epoch
                break
    bar.close()
    recited = text[0] + generated[:-1]
    solved = solved_at is not None
    n_correct = sum(a == b for a, b in zip(generated, goal))

    fig, ax = ctx.figure()
    ax.semilogy(np.arange(1, len(losses) + 1), losses, label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    ax2.plot([e for e, _, _ in progress_log], [c / len(goal) for _, c, _ in progress_log],
             "g.-", label="characters generated correctly")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("fraction of the sentence recited correctly")
    ax.set_title("solved after %d epochs" % solved_at if solved else
                 f"not solved within {cap} epochs")
    fig.legend(loc="center right", bbox_to_anchor=(0.86, 0.5), fontsize=8)
    ctx.savefig(fig, "training")

    if solved:
        summary = f"reproduced the sentence after {solved_at} epochs: {recited!r}"
    else:
        summary = (f"not reproduced within {cap} epochs ({n_correct}/{len(goal)} characters "
                   f"right): {recited!r}")
    print(f"generated after {len(losses)} epochs: {recited}")
    return Result(
        models=["2 x rnnfast.GRU(%d, 50) + Linear(50, %d) softmax" % (len(vocab), len(vocab))],
        metrics=[Metric("2 x GRU(50)", "epochs to reproduce", solved_at if solved else None,
                        "about 500"),
                 Metric("2 x GRU(50)", "characters right", n_correct / len(goal)),
                 Metric("2 x GRU(50)", "generated text", recited)],
        summary=summary,
        reference="the notebook says about 500 epochs solve it",
        details={"sentence": text, "generated": recited, "solved": solved,
                 "epochs_run": len(losses), "cap": cap, "check_every": CHECK_EVERY,
                 "progress": [{"epoch": e, "correct": c, "text": text[0] + g[:-1]}
                              for e, c, g in progress_log],
                 "final_loss": losses[-1]},
        epochs=len(losses),
    )
