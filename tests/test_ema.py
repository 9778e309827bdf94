"""The weights' moving average (train.ema_decay): validated and kept, resumed with the branch."""

from __future__ import annotations

import pytest

from plantml.config import ParamsError, load_params

torch = pytest.importorskip("torch")

OVERRIDES = {"train.epochs": 3, "train.image_size": 32, "train.batch_size": 8, "train.patience": 10,
             "train.models.cnn.arch": "tiny_cnn", "train.models.cnn.lr": 0.03}


def test_off_by_zero_and_the_raw_model_is_evaluated():
    from plantml.training.ema import evaluated_model, weight_average

    model = torch.nn.Linear(2, 2)
    assert weight_average(model, 0.0) is None
    assert evaluated_model(model, None) is model


def test_the_average_lags_the_weights_and_its_decay_warms_up():
    from plantml.training.ema import evaluated_model, weight_average

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    average = weight_average(model, 0.99)
    assert evaluated_model(model, average) is average.module
    # The first update copies (decay 0: nothing to average yet); later ones move part of the way.
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model, step=1)
    assert float(average.module.weight.detach()) == pytest.approx(1.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    average.update(model, step=100)
    decay = average.get_decay(100)
    assert 0.9 < decay < 0.99  # warmed up part of the way to the cap
    assert float(average.module.weight.detach()) == pytest.approx(decay * 1.0 + (1 - decay) * 2.0)
    assert average.get_decay(10**7) == pytest.approx(0.99)  # capped


def test_the_decay_is_checked_at_load():
    with pytest.raises(ParamsError, match="ema_decay"):
        load_params(overrides={"train.ema_decay": 1.0})


def test_the_average_changes_what_is_validated_not_how_the_model_trains(tiny_shards, tmp_path):
    from plantml.training import train_model
    from plantml.training.checkpoints import load_checkpoint

    index = tiny_shards[2]
    runs = {}
    for decay in (0.0, 0.9):
        params = load_params(overrides={**OVERRIDES, "train.ema_decay": decay})
        runs[decay] = train_model("cnn", params.train.models["cnn"], params.train, index, tmp_path / str(decay),
                                  progress=False)
    raw, averaged = runs[0.0].history, runs[0.9].history
    # Same optimiser steps, same data: identical training losses ...
    assert [h["train_loss"] for h in averaged] == pytest.approx([h["train_loss"] for h in raw], rel=1e-6)
    # ... but validation scores other weights, and those are the ones kept.
    assert [h["val_loss"] for h in averaged] != pytest.approx([h["val_loss"] for h in raw], rel=1e-6)
    kept = {k: v for k, v in load_checkpoint(runs[0.9].checkpoint_path)[0].state_dict().items()}
    last_raw = load_checkpoint(runs[0.0].checkpoint_path)[0].state_dict()
    assert any(not torch.equal(kept[k], last_raw[k]) for k in kept if kept[k].is_floating_point())


def test_a_resumed_branch_continues_its_average(tiny_shards, tmp_path, monkeypatch):
    from plantml.training import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV, InjectedFailure, train_model

    params = load_params(overrides={**OVERRIDES, "train.ema_decay": 0.9})
    index = tiny_shards[2]
    reference = train_model("cnn", params.train.models["cnn"], params.train, index, tmp_path / "ref", progress=False)
    ckpt = str(tmp_path / "store" / "last.pt")
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "3")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "failed-once"))
    with pytest.raises(InjectedFailure):
        train_model("cnn", params.train.models["cnn"], params.train, index, tmp_path / "a1", progress=False,
                    checkpoint_uri=ckpt)
    retried = train_model("cnn", params.train.models["cnn"], params.train, index, tmp_path / "a2", progress=False,
                          checkpoint_uri=ckpt)
    assert retried.resumed_from_epoch == 2
    # Epoch 3 validates the average carried over from epoch 2's checkpoint, not a fresh copy of the weights.
    assert retried.history[-1]["val_loss"] == pytest.approx(reference.history[-1]["val_loss"], rel=1e-5)
