"""One training step's pieces in ``stages.train``: a gradient that is not finite leaves the weights
alone (``apply_gradients``); ``precision`` bf16 runs the forward in bfloat16 (``_autocast``)."""
from __future__ import annotations

import torch
from torch import nn

from stages.train import _autocast, apply_gradients


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


def test_bf16_precision_runs_matrix_products_in_bfloat16_and_keeps_fp32_weights():
    layer = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with _autocast("bf16", torch.device("cpu")):
        out = layer(x)
    with _autocast("fp32", torch.device("cpu")):
        full = layer(x)
    assert out.dtype == torch.bfloat16 and full.dtype == torch.float32 and layer.weight.dtype == torch.float32
    torch.testing.assert_close(out.float(), full, atol=0.05, rtol=0.05)
