"""Micro-batching (train.micro_batch_size): same gradients as the whole batch, less memory held."""

import pytest
import torch

from plantml.config import load_params
from plantml.training.epoch import accumulate_gradients, micro_batches


def test_micro_batches_cut_and_never_leave_a_single_image():
    assert micro_batches(32, 16) == [slice(0, 16), slice(16, 32)]
    assert micro_batches(32, 0) == [slice(0, 32)]
    assert micro_batches(10, 16) == [slice(0, 10)]
    # 33 = 16 + 16 + 1: the lone image joins the last chunk (BatchNorm cannot train on one image)
    assert micro_batches(33, 16) == [slice(0, 16), slice(16, 33)]
    assert micro_batches(7, 3) == [slice(0, 3), slice(3, 7)]


def _grads(micro: int) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    # No BatchNorm here: with it, micro-batches see their own statistics ("ghost" batches) by design.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 5))
    x = torch.randn(12, 3, 8, 8)
    y = torch.randint(0, 5, (12,))
    params = load_params(overrides={"train.micro_batch_size": micro}).train
    loss, _ = accumulate_gradients(model, x, y, params, "cpu")
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro", [5, 4, 1])
def test_micro_batched_gradients_equal_the_whole_batch(micro):
    whole_loss, whole = _grads(0)
    loss, grads = _grads(micro)
    assert loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(whole, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
