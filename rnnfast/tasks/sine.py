"""sine: forecasting a noisy sine, the lecture's "simple example".

x_t = sin(0.02 t) + 2 U(0, 1) for t < 1000; the first 800 points train, the rest
test.  Each input is a window of 4 consecutive values, fed as ONE time step of 4
features; the target is the next value (each part is padded with 4 copies of its
last value so that there is one window per point, as in the lecture).  Model:
``rnnfast.RNN(4, 32, nonlinearity='relu')`` -> Linear(8) relu -> Linear(1);
RMSprop (Keras defaults: lr 1e-3, rho 0.9), MSE, batch 16, 100 epochs.

Keras' default initialisation, as in the lecture (see ``common.keras_init``).

Quick mode: 5 epochs.
"""

import numpy as np
import torch
from torch import nn

import rnnfast
from rnnfast.data import synthetic

from .common import Metric, Result, keras_init

TITLE = "noisy sine forecast with an Elman network"
SOURCE = "000 'A simple example'"
DEFAULT_SEED = 0
STEP, N, TP = 4, 1000, 800


class SineNet(nn.Module):
    def __init__(self, step=STEP, hidden=32):
        super().__init__()
        self.rnn = rnnfast.RNN(step, hidden, nonlinearity="relu", batch_first=True)
        self.fc = nn.Linear(hidden, 8)
        self.out = nn.Linear(8, 1)
        keras_init(self)  # the lecture's Keras model, Keras' default initialisation

    def forward(self, x):              # x: (batch, 1, step)
        _, h = self.rnn(x)             # last hidden state (1, batch, hidden)
        return self.out(torch.relu(self.fc(h[-1])))


def run(ctx):
    epochs = ctx.epochs(100, quick=5)
    series = synthetic.noisy_sine(ctx.rng, N)
    xtr, ytr = synthetic.sliding_windows(series[:TP], STEP)
    xte, yte = synthetic.sliding_windows(series[TP:], STEP)
    Xtr, Ytr = ctx.tensor(xtr[:, None, :]), ctx.tensor(ytr[:, None])
    Xte, Yte = ctx.tensor(xte[:, None, :]), ctx.tensor(yte[:, None])

    model = SineNet().to(ctx.device)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = nn.MSELoss()
    gen = torch.Generator().manual_seed(ctx.seed)
    history = []
    bar = ctx.progress(epochs, "Elman(32, relu)")
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=gen).to(ctx.device)
        total = 0.0
        for i in range(0, len(perm), 16):
            idx = perm[i:i + 16]
            opt.zero_grad()
            loss = loss_fn(model(Xtr[idx]), Ytr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(perm))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        bar.update()
    bar.close()

    model.eval()
    with torch.no_grad():
        ptr, pte = model(Xtr), model(Xte)
        train_mse = loss_fn(ptr, Ytr).item()
        test_mse = loss_fn(pte, Yte).item()
    predicted = np.concatenate([ptr.cpu().numpy()[:, 0], pte.cpu().numpy()[:, 0]])
    # the noise alone, 2 U(0,1), has variance 4/12: the best possible MSE is about 0.333
    noise_floor = 4.0 / 12.0

    fig, ax = ctx.figure(figsize=(9, 4))
    t = np.arange(N)
    ax.plot(t, series, lw=0.8, label="data")
    ax.plot(t, predicted, lw=1.2, label="prediction")
    ax.axvline(TP, color="r", label="train | test")
    ax.set_xlabel("t")
    ax.set_title(f"noisy sine: train MSE {train_mse:.3f}, test MSE {test_mse:.3f}")
    ax.legend(loc="lower left")
    ctx.savefig(fig, "prediction")

    fig, ax = ctx.figure()
    ax.plot(np.arange(1, epochs + 1), history)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training MSE")
    ctx.savefig(fig, "loss")

    return Result(
        models=["rnnfast.RNN(4, 32, relu) + Linear(32, 8) relu + Linear(8, 1)"],
        metrics=[Metric("Elman(32, relu)", "train MSE", train_mse),
                 Metric("Elman(32, relu)", "test MSE", test_mse)],
        summary=f"train MSE {train_mse:.4f}, test MSE {test_mse:.4f} "
                f"(noise variance {noise_floor:.3f})",
        reference="the lecture prints the training MSE (no figure given)",
        details={"history": history, "noise_variance": noise_floor},
        epochs=epochs,
    )
