"""sales: forecasting monthly retail sales with an LSTM with ReLU activation.

The FRED series RSCCASN (clothing and clothing accessory stores, millions of USD,
not seasonally adjusted, 334 months to 2019-10).  The last 18 months are held
out; the series is min-max scaled with the training part's range; windows of 12
months predict the next month.  Model: ``rnnfast.LSTM(1, 100,
activation='relu')`` (Keras' ``LSTM(100, activation='relu')``: ReLU for the cell
candidate and the cell output) -> Linear(1); Adam (lr 1e-3), MSE, batch 1, at
most 20 epochs with early stopping on the validation loss (the held-out
windows, patience 5, the last weights kept, as Keras' EarlyStopping does).
Then the 18 held-out months are forecast autoregressively from the last 12
training months, and 24 months past the end of the data from its last 12.

Keras' default initialisation, as in the guide (see ``common.keras_init``).

The metric is the RMSE of the held-out forecast in sales units (millions of USD).

Quick mode: 2 epochs.
"""

import numpy as np
import torch
from torch import nn

import rnnfast
from rnnfast.data import sales as sales_data

from .common import Metric, Result, keras_init

TITLE = "retail sales forecast with LSTM(100, activation relu)"
SOURCE = "004 3.3"
DEFAULT_SEED = 0
TEST_SIZE, LENGTH, FUTURE = 18, 12, 24
USD_SERIES = ("RSCCASN", "S4248SM144NCEN")  # FRED retail series in millions of USD


class SalesLSTM(nn.Module):
    def __init__(self, hidden=100):
        super().__init__()
        self.lstm = rnnfast.LSTM(1, hidden, activation="relu", batch_first=True)
        self.out = nn.Linear(hidden, 1)
        keras_init(self)  # the guide's Keras model, Keras' default initialisation

    def forward(self, x):            # (batch, LENGTH, 1)
        _, (h, _) = self.lstm(x)
        return self.out(h[-1])


def forecast(ctx, model, last_window, n):
    window = list(last_window)
    out = []
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            p = float(model(ctx.tensor(np.array(window[-LENGTH:])[None, :, None])))
            out.append(p)
            window.append(p)
    return np.array(out)


def run(ctx):
    series = sales_data.load(ctx.data)
    values = series.values
    if len(values) < TEST_SIZE + 2 * LENGTH:
        raise sales_data.DataError(series.source, f"only {len(values)} months",
                                   f"at least {TEST_SIZE + 2 * LENGTH} monthly values",
                                   sales_data.WHERE)
    epochs = ctx.epochs(20, quick=2)
    train, test = values[:-TEST_SIZE], values[-TEST_SIZE:]
    scaler = sales_data.MinMaxScaler().fit(train)
    s_train, s_test = scaler.transform(train), scaler.transform(test)
    xtr, ytr = sales_data.windows(s_train, LENGTH)
    xva, yva = sales_data.windows(s_test, LENGTH)
    Xtr, Ytr = ctx.tensor(xtr[:, :, None]), ctx.tensor(ytr[:, None])
    Xva, Yva = ctx.tensor(xva[:, :, None]), ctx.tensor(yva[:, None])

    model = SalesLSTM().to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    gen = torch.Generator().manual_seed(ctx.seed)
    hist = {"loss": [], "val_loss": []}
    best, wait, stopped = float("inf"), 0, None
    bar = ctx.progress(epochs, "LSTM(100, relu)")
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(Xtr), generator=gen).tolist()
        total = 0.0
        for i in perm:                       # batch size 1
            opt.zero_grad()
            loss = loss_fn(model(Xtr[i:i + 1]), Ytr[i:i + 1])
            loss.backward()
            opt.step()
            total += loss.item()
        model.eval()
        with torch.no_grad():
            val = loss_fn(model(Xva), Yva).item() if len(Xva) else float("nan")
        hist["loss"].append(total / len(perm))
        hist["val_loss"].append(val)
        bar.set_postfix(loss=f"{hist['loss'][-1]:.4f}", val_loss=f"{val:.4f}")
        bar.update()
        if val < best:
            best, wait = val, 0
        else:
            wait += 1
            if wait >= 5:
                stopped = epoch
                break
    bar.close()

    test_pred = scaler.inverse_transform(forecast(ctx, model, s_train[-LENGTH:], TEST_SIZE))
    rmse = float(np.sqrt(np.mean((test_pred - test) ** 2)))
    future = scaler.inverse_transform(
        forecast(ctx, model, scaler.transform(values)[-LENGTH:], FUTURE))
    dates = np.array(series.dates, dtype="datetime64[D]")
    future_dates = np.array([sales_data.add_months(series.dates[-1], k + 1)
                             for k in range(FUTURE)], dtype="datetime64[D]")

    fig, axes = ctx.figure(2, 1, figsize=(10, 7))
    for ax, zoom in zip(axes, (False, True)):
        start = len(values) - TEST_SIZE - 30 if zoom else 0
        ax.plot(dates[start:-TEST_SIZE + 1], values[start:-TEST_SIZE + 1], color="tab:blue",
                label="history (training part)")
        ax.plot(dates[-TEST_SIZE:], test, color="black", lw=2, label="held-out truth")
        ax.plot(dates[-TEST_SIZE:], test_pred, "--", color="tab:orange", lw=2,
                label=f"held-out forecast (RMSE {rmse:.0f})")
        ax.plot(future_dates, future, "--", color="tab:green", lw=2,
                label=f"forecast, {FUTURE} months ahead")
        ax.set_ylabel(series.name + (" (millions of USD)" if series.name.upper() in USD_SERIES
                                     else ""))
    axes[0].set_title("retail sales: history, held-out truth and forecasts")
    axes[1].set_title("the last 4 years and the forecasts")
    axes[1].legend(fontsize=8, loc="upper left")
    ctx.savefig(fig, "forecast")

    fig, ax = ctx.figure()
    ep = np.arange(1, len(hist["loss"]) + 1)
    ax.plot(ep, hist["loss"], "o-", label="loss")
    ax.plot(ep, hist["val_loss"], "s--", label="val_loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (scaled)")
    ax.legend()
    ctx.savefig(fig, "loss")

    units = "millions of USD" if series.name.upper() in USD_SERIES else f"{series.name} units"
    stop_note = f"early stop after epoch {stopped}" if stopped else f"{len(ep)} epochs"
    return Result(
        models=["rnnfast.LSTM(1, 100, activation='relu') + Linear(100, 1)"],
        metrics=[Metric("LSTM(100, relu)", "held-out RMSE", rmse)],
        summary=f"RMSE of the {TEST_SIZE}-month held-out forecast {rmse:.1f} ({units}, "
                f"held-out mean {test.mean():.0f}); {stop_note}",
        reference="the guide computes this RMSE in sales units (no figure given)",
        details={"data_source": series.source, "series": series.name, "units": units,
                 "n_months": len(values), "early_stopped_at": stopped, "history": hist,
                 "held_out_truth": test.tolist(), "held_out_forecast": test_pred.tolist(),
                 "future_forecast": {str(d): float(v) for d, v in zip(future_dates, future)}},
        epochs=len(ep),
    )
