"""A step whose gradient is not finite leaves the weights alone (``stages.train.apply_gradients``)."""
from __future__ import annotations

import torch
from torch import nn

from stages.train import apply_gradients


def test_a_finite_gradient_is_clipped_and_applied_and_an_overflow_is_skipped():
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = [p.detach().clone() for p in layer.parameters()]
    x = torch.ones(2, 3)
    (1e6 * layer(x).sum()).backward()  # a huge but finite gradient: clipped to norm 1, then applied
    assert apply_gradients(opt, layer.parameters(), max_norm=1.0)
    step = torch.cat([(a - p.detach()).flatten() for a, p in zip(before, layer.parameters())])
    torch.testing.assert_close(step.norm(), torch.tensor(1.0))

    for bad in (float("inf"), float("nan")):
        after_good = [p.detach().clone() for p in layer.parameters()]
        opt.zero_grad()
        (bad * layer(x).sum()).backward()
        assert not apply_gradients(opt, layer.parameters(), max_norm=1.0)
        for kept, p in zip(after_good, layer.parameters()):
            torch.testing.assert_close(p.detach(), kept)  # untouched: not NaN, not moved
