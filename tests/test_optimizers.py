"""SAM / F-SAM against closed-form updates on a quadratic, and their contract with BatchNorm and schedulers."""

from __future__ import annotations

import copy

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
    """The official code: the first step is SAM's and starts the EMA at that gradient; later steps subtract the
    previous EMA, then update it."""
    sigma, lam = 0.7, 0.9
    w, m = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), None
    for _ in range(4):
        g = grad(w)
        d = g if m is None else g - sigma * m  # previous EMA first ...
        m = g.clone() if m is None else lam * m + (1 - lam) * g  # ... then the update
        w = w - LR * grad(w + RHO * d / d.norm())
    torch.testing.assert_close(run("fsam", 4, sigma=sigma, lam=lam), w, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(run("fsam", 4, sigma=sigma, lam=lam), run("sam", 4))  # the EMA does change the path


def test_label_noise_flips_exactly_the_share_to_other_classes():
    from pipelines.flows.optim import noisy_labels

    labels = torch.arange(1000) % 10
    noisy = noisy_labels(labels, 0.3, 10, seed=0)
    assert int((noisy != labels).sum()) == 300  # every chosen label changes class
    assert torch.equal(noisy, noisy_labels(labels, 0.3, 10, seed=0))


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


# Flat-LoRA -----------------------------------------------------------------------------------------------------

def _adapted(sigma=0.05, seed=0):
    from training.flat_lora import FlatLoRANoise, add_lora

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    layers = add_lora(model, rank=2, alpha=4.0)
    return model, layers, FlatLoRANoise(layers, sigma=sigma, total_steps=10, seed=seed), frozen


def test_flat_lora_noise_has_the_stated_per_row_std():
    from training.flat_lora import LoRALayer

    torch.manual_seed(0)
    base = nn.Linear(4096, 64)
    base.weight.data *= torch.linspace(0.2, 3.0, 64)[:, None]  # rows of very different norms
    layer = LoRALayer(base, rank=4, alpha=4.0, index=0)
    layer.sigma, layer.noise_seed = 0.05, 123
    w = layer.merged_weight().detach()
    noise = layer.perturbation(w)
    expected = 0.05 * w.norm(dim=1) / 4096**0.5
    ratio = noise.std(dim=1) / expected
    assert (ratio - 1).abs().max() < 0.05  # 4096 draws per row: standard error ~1.1%
    assert noise.mean(dim=1).abs().max() < 4 * expected.max() / 64  # zero mean
    assert torch.equal(noise, layer.perturbation(w))  # regenerated from the seed, not stored
    layer.noise_seed = 124
    assert not torch.equal(noise, layer.perturbation(w))


def test_flat_lora_sigma_ramps_up_along_a_cosine_and_seeds_differ_per_layer_and_step():
    _, layers, noise, _ = _adapted(sigma=0.05)
    assert noise.sigma_at(0) == 0.0 and noise.sigma_at(5) == pytest.approx(0.025) and noise.sigma_at(10) == 0.05
    noise.set_step(3)
    seeds = [layer.noise_seed for layer in layers]
    assert len(set(seeds)) == len(layers)
    noise.set_step(4)
    assert all(layer.noise_seed not in seeds for layer in layers)


def test_flat_lora_training_never_touches_the_frozen_weights():
    model, layers, noise, _ = _adapted()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if n.endswith("base.weight")} == {"0.base.weight", "5.base.weight"}
    opt = build_optimizer("adamw", model.parameters(), lr=0.05)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    model.train()
    for step in range(5):
        noise(step + 1, model, opt)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(layer.lora_B.abs().sum() > 0 for layer in layers)  # the adapters did learn
    params = dict(model.named_parameters())
    for n, v in frozen.items():  # bit-identical: base conv/linear weights and biases, BatchNorm affine
        assert torch.equal(params[n], v), n


def test_merged_model_matches_the_adapted_one_with_noise_off():
    from training.flat_lora import LoRALayer, merge_lora

    model, layers, noise, _ = _adapted()
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()  # non-trivial adapters
    noise.set_step(7)  # sigma > 0: noise would be on in training mode
    model.eval()
    x = torch.rand(4, 3, 8, 8)
    expected = model(x)
    model.train()
    assert not torch.allclose(model[0](x), model[0].base(x))  # training mode: perturbed (and adapted) weights
    model.eval()
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)


def test_shift_images_blurs_and_lowers_contrast_towards_the_tint():
    from pipelines.config import DomainShift
    from pipelines.flows.optim import shift_images

    flat = torch.full((1, 3, 6, 6), 200, dtype=torch.uint8)
    out = shift_images(flat, DomainShift(contrast=0.5, blur=3, tint=[0, 100, 200]))
    assert out[0, :, 0, 0].tolist() == [100, 150, 200]  # 0.5 * 200 + 0.5 * tint, blur of a flat image is flat
    edge = torch.zeros(1, 3, 6, 6, dtype=torch.uint8)
    edge[..., 3:] = 255
    blurred = shift_images(edge, DomainShift(contrast=1.0, blur=3, tint=[0, 0, 0]))
    assert blurred[0, 0, 0].tolist() == [0, 0, 85, 170, 255, 255]


@pytest.mark.slow
def test_optim_stage_on_the_small_world(trained_zoo, small_world, prefect_server, tmp_path):

    from pipelines.config import Optim
    from pipelines.flows.optim import optim_flow
    from pipelines.stages import DownstreamPaths, read_models_file
    from shards.shardset import shard_name, write_index, write_shard
    from sources.reading import load_split

    xv, yv, _ = load_split(small_world / "val", 32)
    sets = {}
    for name, images in (("clean", xv[:40]), ("aoa", 255 - xv[:40])):  # an "attack" any model notices
        write_shard(tmp_path / name / shard_name(name, 0),
                    [{"key": f"k{i:03d}", "image": images[i].permute(1, 2, 0).numpy(), "cls": int(yv[i]), "json": {}}
                     for i in range(40)])
        write_index(tmp_path / name, name)
        sets[name] = str(tmp_path / name)
    spec = next(s for s in trained_zoo["zoo"].specs() if s.name == "resnet10t")
    cfg = Optim(**{"model": "resnet10t", "train_root": str(small_world / "train"), "val_root": str(small_world / "val"),
           "seed": 0, "recipe": {"epochs": 1, "lr": 0.05, "batch_size": 64, "optimizer": "sgd", "warmup_epochs": 0},
           "optimizers": {"sgd": {}, "fsam": {"optimizer": "fsam", "optimizer_kwargs": {"rho": 0.05}}},
           "lora": {"shift": {"contrast": 0.35, "blur": 3, "tint": [150, 110, 90]}, "train_images": 200, "rank": 2,
                    "alpha": 4, "recipe": {"epochs": 1, "lr": 0.003, "optimizer": "adamw", "warmup_epochs": 0},
                    "runs": {"lora": {"sigma": 0.0}, "flat-lora": {"sigma": 0.05}}},
           "shard_sets": sets, "seeds": [0, 1], "label_noise": 0.2})
    metrics = optim_flow(cfg, spec, DownstreamPaths(tmp_path / "optim", tmp_path / "optim.json", tmp_path / "reports",
                                                    tmp_path / "plots"))
    assert list(metrics["optimizers"]) == ["sgd", "fsam"] and list(metrics["lora"]) == ["lora", "flat-lora"]
    assert metrics["lora"]["flat-lora"]["sigma"] == 0.05
    import csv

    finals = [float(list(csv.DictReader(open(tmp_path / "plots" / f"sgd-seed{seed}.csv")))[-1]["val_acc"])
              for seed in (0, 1)]  # per-epoch curves end where the metrics are; the metrics are their mean ± std
    assert metrics["optimizers"]["sgd"]["val_acc"] == pytest.approx(sum(finals) / 2, abs=0.01)
    assert metrics["optimizers"]["sgd"]["val_acc_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5, abs=0.01)
    rows = list(csv.DictReader(open(tmp_path / "plots" / "flat-lora.csv")))
    assert list(rows[0])[-1] == "val_acc"
    assert float(rows[-1]["val_acc"]) == pytest.approx(metrics["lora"]["flat-lora"]["val_acc"], abs=0.01)
    specs = read_models_file(tmp_path / "optim" / "models.json")
    assert [s.name for s in specs] == ["opt-sgd-seed0", "opt-sgd-seed1", "opt-fsam-seed0", "opt-fsam-seed1",
                                          "opt-lora", "opt-flat-lora"]
    # the merged checkpoint is a plain timm model that the evaluate stage can load and that scores as reported
    from evaluators.classification import evaluate_shardset
    from model_zoo.zoo import build_model

    merged = build_model(specs[5])
    assert evaluate_shardset(merged, sets["aoa"])["top1"] == metrics["lora"]["flat-lora"]["aoa"]
    page = (tmp_path / "reports" / "optim" / "index.md").read_text()
    assert "| flat-lora |" in page and "fsam vs sgd" in page and "20% replaced" in page


def test_sam_state_dict_carries_the_base_momentum_and_the_fsam_ema():
    """What a checkpoint (and the CO monitor's rollback) needs to resume exactly."""

    def make():
        w = nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
        return w, build_optimizer("fsam", [w], lr=LR, momentum=0.9, rho=RHO, sigma=0.5)

    def step(w, opt):
        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w - B @ w
            loss.backward()
            return loss

        opt.step(closure)

    w, opt = make()
    for _ in range(3):
        step(w, opt)
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())  # state_dict holds live tensors
    step(w, opt)
    expected = w.detach().clone()
    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(saved_w)
    opt2.load_state_dict(saved)
    step(w2, opt2)
    assert torch.equal(w2.detach(), expected)
    assert opt2.param_groups is opt2.base_optimizer.param_groups


@pytest.mark.parametrize("peak", [0.5, 0.4])
def test_the_cyclic_schedule_is_the_triangle_of_the_fast_at_codes(peak):
    """Linear from 0 to the peak (at ``peak`` of the run: Wong et al.'s CIFAR-10 code 1/2, their MNIST code 2/5),
    then linear back to 0, as ``np.interp`` draws it; the rise counts the step being taken, so the first step
    does not train at a learning rate of 0."""
    import numpy as np

    from training.supervised import lr_factor

    total = 50
    ours = [lr_factor("cyclic", s, total, 0, peak) for s in range(total)]
    triangle = np.interp(np.arange(1, total + 1), [0, total * peak, total], [0, 1, 0])
    assert ours[:int(total * peak)] == pytest.approx(triangle[:int(total * peak)])
    assert ours[int(total * peak):] == pytest.approx(np.interp(np.arange(int(total * peak), total),
                                                               [0, total * peak, total], [0, 1, 0]))
    assert max(ours) == pytest.approx(1.0)
