"""fashion-mnist: Fashion-MNIST images read row by row by an LSTM.

Each 28 x 28 image is a sequence of 28 time steps of 28 pixels (scaled to
[0, 1]).  Model: ``rnnfast.LSTM(28, 30)`` -> Linear(10) softmax (cross-entropy on
the logits); RMSprop (Keras defaults: lr 1e-3, rho 0.9), batch 128, 10 epochs.

Data: the four standard IDX files (train/t10k, ``.gz`` or not), Kaggle's CSV
pair, or one CSV file (label + 784 pixels per row) whose last 20% of rows are
held out, e.g. the 1000-image sample ``fashion-mnist_1000rows.csv``.

Keras' default initialisation, as in the notebook (see ``common.keras_init``).

Quick mode: at most 1000 training and 500 test images, 2 epochs.
"""

import numpy as np
import torch
from torch import nn

import rnnfast
from rnnfast.data import fashion_mnist as fm

from .common import Metric, Result, keras_init

TITLE = "Fashion-MNIST rows as time steps with an LSTM"
SOURCE = "003"
DEFAULT_SEED = 0


class RowLSTM(nn.Module):
    def __init__(self, hidden=30, n_classes=10):
        super().__init__()
        self.lstm = rnnfast.LSTM(28, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_classes)
        keras_init(self)  # the notebook's Keras model, Keras' default initialisation

    def forward(self, x):            # (batch, 28 rows, 28 pixels)
        _, (h, _) = self.lstm(x)
        return self.out(h[-1])       # logits; softmax lives in the loss


def run(ctx):
    split = fm.load(ctx.data)
    xtr, ytr, xte, yte = split.x_train, split.y_train, split.x_test, split.y_test
    if ctx.quick:
        xtr, ytr, xte, yte = xtr[:1000], ytr[:1000], xte[:500], yte[:500]
    epochs = ctx.epochs(10, quick=2)
    Xtr, Ytr = ctx.tensor(xtr / 255.0), ctx.tensor(ytr, torch.long)
    Xte, Yte = ctx.tensor(xte / 255.0), ctx.tensor(yte, torch.long)

    model = RowLSTM().to(ctx.device)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(ctx.seed)
    batch = 128
    hist = {"loss": [], "accuracy": []}
    n_batches = (len(Xtr) + batch - 1) // batch
    bar = ctx.progress(epochs * n_batches, "LSTM(30)", unit="batch")
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=gen).to(ctx.device)
        tot, correct = 0.0, 0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            logits = model(Xtr[idx])
            loss = loss_fn(logits, Ytr[idx])
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            correct += int((logits.argmax(1) == Ytr[idx]).sum())
            bar.set_postfix(epoch=ep + 1, loss=f"{loss.item():.4f}")
            bar.update()
        hist["loss"].append(tot / len(perm))
        hist["accuracy"].append(correct / len(perm))
    bar.close()

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(Xte[i:i + 1024]) for i in range(0, len(Xte), 1024)])
        test_loss = loss_fn(logits, Yte).item()
        pred = logits.argmax(1).cpu().numpy()
    test_acc = float((pred == yte).mean())
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (yte, pred), 1)
    chance = float(np.bincount(yte, minlength=10).max() / len(yte))

    fig, ax = ctx.figure(figsize=(6.5, 5.5))
    im = ax.matshow(cm, cmap="gray")
    fig.colorbar(im)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_yticklabels(fm.CLASSES, fontsize=8)
    ax.set_xticklabels(fm.CLASSES, fontsize=8, rotation=90)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, test accuracy {test_acc:.3f}")
    ctx.savefig(fig, "confusion_matrix")

    fig, ax = ctx.figure()
    ep = np.arange(1, epochs + 1)
    ax.plot(ep, hist["loss"], "o-", label="training loss")
    ax.plot(ep, hist["accuracy"], "s-", label="training accuracy")
    ax.set_xlabel("epoch")
    ax.legend()
    ctx.savefig(fig, "training")

    return Result(
        models=["rnnfast.LSTM(28, 30) + Linear(30, 10) softmax"],
        metrics=[Metric("LSTM(30)", "test loss", test_loss),
                 Metric("LSTM(30)", "test accuracy", test_acc)],
        summary=f"test loss {test_loss:.4f}, test accuracy {test_acc:.4f} on {len(yte)} "
                f"held-out images ({split.held_out}; most frequent class {chance:.2f})",
        reference="the notebook prints test loss and accuracy (no fixed figure)",
        details={"data_source": split.source, "held_out": split.held_out,
                 "n_train": int(len(ytr)), "n_test": int(len(yte)), "history": hist,
                 "confusion_matrix": cm.tolist(), "majority_class_rate": chance},
        epochs=epochs,
    )
