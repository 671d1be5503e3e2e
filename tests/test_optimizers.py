"""SAM / F-SAM against closed-form updates on a quadratic, and their contract with BatchNorm and schedulers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from training.optimizers import build_optimizer, schedulable

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 2.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
LR, RHO = 0.1, 0.3


def grad(w):  # of L(w) = 1/2 w^T A w - b^T w
    return A @ w - B


def run(name, steps, **kw):
    w = nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    opt = build_optimizer(name, [w], lr=LR, momentum=0.0, rho=RHO, **kw)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w - B @ w
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return w.detach()


def test_sam_step_is_the_closed_form():
    w = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    for _ in range(3):
        g = grad(w)
        w = w - LR * grad(w + RHO * g / g.norm())
    torch.testing.assert_close(run("sam", 3), w, rtol=1e-12, atol=1e-12)


def test_fsam_step_is_the_closed_form_with_the_previous_ema_subtracted():
    sigma, lam = 0.7, 0.9
    w, m = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for _ in range(4):
        g = grad(w)
        d = g - sigma * m  # previous EMA first ...
        m = lam * m + (1 - lam) * g  # ... then the update
        w = w - LR * grad(w + RHO * d / d.norm())
    torch.testing.assert_close(run("fsam", 4, sigma=sigma, lam=lam), w, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(run("fsam", 4, sigma=sigma, lam=lam), run("sam", 4))  # the EMA does change the path


def test_fsam_with_sigma_zero_is_sam():
    assert torch.equal(run("fsam", 5, sigma=0.0), run("sam", 5))


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_batchnorm_statistics_see_only_the_first_pass(name):
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    reference = _bn_net().train()
    reference(x)  # one forward in train mode: what the running statistics should reflect
    net = _bn_net().train()
    opt = build_optimizer(name, net.parameters(), lr=0.1, rho=0.5, model=net)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    bn, ref_bn = net[1], reference[1]
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 1


def test_parameters_without_gradients_are_left_alone_and_scheduler_drives_the_base():
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.full((2,), 5.0))
    opt = build_optimizer("sam", [used, unused], lr=1.0, momentum=0.0, rho=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(schedulable(opt), lambda s: 0.5 ** s)

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    before = used.detach().clone()
    opt.step(closure)
    sched.step()
    assert torch.equal(unused.detach(), torch.full((2,), 5.0))
    assert not torch.equal(used.detach(), before)
    assert opt.param_groups[0]["lr"] == 0.5 == schedulable(opt).param_groups[0]["lr"]


def test_unknown_optimizer_and_options_are_named():
    p = [nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*sgd"):
        build_optimizer("adam", p, lr=0.1)
    with pytest.raises(ValueError, match=r"unknown options \['rh0'\]"):
        build_optimizer("sam", p, lr=0.1, rh0=0.1)
