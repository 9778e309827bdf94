"""Outlier Exposure (train.outlier_exposure): leafless rows trained towards a uniform prediction."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plantml.config import ParamsError, load_params
from plantml.training.epoch import accumulate_gradients
from plantml.training.outliers import (NO_CLASS, classification_loss, outlier_source, outliers_per_batch,
                                       with_outliers)


def test_without_outlier_rows_the_loss_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(classification_loss(logits, labels, 0.1), expected)


def test_an_outlier_row_costs_its_cross_entropy_to_uniform():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, NO_CLASS])
    ce = float(F.cross_entropy(logits[:1], labels[:1]))
    # A uniform prediction on the outlier row costs log C, the minimum of cross-entropy to uniform.
    assert float(classification_loss(logits, labels, 0.0)) == pytest.approx((ce + math.log(3)) / 2)
    confident = torch.tensor([[2.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    assert float(classification_loss(confident, labels, 0.0)) > float(classification_loss(logits, labels, 0.0))


def test_only_outlier_rows_are_allowed():
    logits = torch.zeros(3, 4)
    loss = classification_loss(logits, torch.full((3,), NO_CLASS), 0.1)
    assert float(loss) == pytest.approx(math.log(4))


def test_outliers_are_mixed_into_the_batch_with_no_class_labels():
    images = torch.randint(0, 255, (8, 16, 16, 3), dtype=torch.uint8)
    labels = torch.arange(8)
    source = outlier_source(0.25, 16, seed=1)
    x, y = with_outliers(images, labels, source, seed=0)
    assert len(x) == len(y) == 8 + outliers_per_batch(0.25, 8) == 10
    assert int((y == NO_CLASS).sum()) == 2
    assert sorted(y[y != NO_CLASS].tolist()) == list(range(8))
    for i in range(8):  # every labelled image kept with its label
        assert torch.equal(x[y == i][0], images[i])
    assert not torch.equal(y[:8], labels)  # shuffled in, not appended
    assert with_outliers(images, labels, None, seed=0) == (images, labels)
    assert outlier_source(0.0, 16, seed=1) is None
    with pytest.raises(ValueError, match="do not match"):
        with_outliers(images, labels, outlier_source(0.25, 12, seed=1), seed=0)


def test_outlier_backgrounds_are_seeded():
    a, b = outlier_source(0.5, 24, seed=3)(4), outlier_source(0.5, 24, seed=3)(4)
    assert a.dtype == torch.uint8 and a.shape == (2, 24, 24, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, outlier_source(0.5, 24, seed=4)(4))


def test_training_on_outliers_lowers_the_confidence_on_leafless_images():
    """A few steps with outlier rows make a tiny model less sure about backgrounds than without them."""

    def train(share: float) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(16, 4))
        params = load_params(overrides={"train.micro_batch_size": 4, "train.outlier_exposure": share}).train
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        rng = np.random.default_rng(0)
        for step in range(150):
            labels = torch.from_numpy(rng.integers(0, 4, 8))
            # class c: a flat image whose channel (c % 3) is bright, brightness by c // 3
            images = torch.full((8, 16, 16, 3), 30, dtype=torch.uint8)
            for i, c in enumerate(labels.tolist()):
                images[i, :, :, c % 3] = 200 + 40 * (c // 3)
            x, y = with_outliers(images, labels, outlier_source(share, 16, seed=step), seed=step)
            opt.zero_grad()
            accumulate_gradients(model, x.permute(0, 3, 1, 2).float() / 255, y, params, "cpu")
            opt.step()
        held_out = outlier_source(1.0, 16, seed=999)(16).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return float(model(held_out).softmax(1).max(1).values.mean())

    assert train(0.5) < train(0.0) - 0.1


def test_the_share_is_checked_at_load():
    assert load_params(overrides={"train.outlier_exposure": 0.125}).train.outlier_exposure == 0.125
    with pytest.raises(ParamsError, match="outlier_exposure"):
        load_params(overrides={"train.outlier_exposure": -0.1})
