"""Adversarial training: perturbation sizes per method, the monitors on hand-checkable cases, CO detection and
rollback, and the stage end to end on the small world."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn as nn

from training.adversarial import METHODS, create_method
from training.adversarial.monitors import (
    CODetector,
    COMonitor,
    restore,
    robustness_check,
    snapshot,
    top_channel_share,
)

EPS = 8 / 255


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(16, 3, 8, 8, generator=g) * 0.8 + 0.1, torch.randint(0, 4, (16,), generator=g)  # away from 0/1


@pytest.mark.parametrize("name", ["fgsm", "fgsm-rs", "gradalign", "pgd-at"])
def test_projected_methods_stay_in_the_eps_ball(name):
    x, y = _batch()
    delta = create_method(name, eps=EPS).perturb(_cnn(), x, y)
    assert delta.abs().max() <= EPS + 1e-7
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    if name in ("fgsm", "gradalign"):  # one signed step of eps from the clean image: every pixel moves by exactly eps
        torch.testing.assert_close(delta.abs(), torch.full_like(delta, EPS))


def test_n_fgsm_exceeds_eps_by_design_up_to_three_eps():
    """N-FGSM: noise U(-2 eps, 2 eps) plus a step of eps and no projection, so |delta| reaches past eps (up to 3 eps)."""
    x, y = _batch()
    delta = create_method("n-fgsm", eps=EPS).perturb(_cnn(), x, y)
    assert delta.abs().max() > 2 * EPS
    assert delta.abs().max() <= 3 * EPS + 1e-7


def test_fgsm_rs_steps_one_and_a_quarter_eps_from_its_random_start():
    m = create_method("fgsm-rs", eps=EPS)
    assert m.alpha == pytest.approx(1.25 * EPS)
    assert create_method("pgd-at", eps=EPS).alpha == pytest.approx(EPS / 4)
    assert create_method("gradalign", eps=8 / 255).lam == pytest.approx(0.2)
    assert create_method("gradalign", eps=16 / 255).lam == pytest.approx(2.0)


def test_on_a_black_image_a_clamped_start_turns_fgsm_rs_into_fgsm_and_a_free_start_does_not():
    """Digits are mostly black: a start clamped to the image keeps only its positive half there, so the 1.25 eps
    step always reaches the eps bound and FGSM-RS gives FGSM's perturbation; Wong et al.'s MNIST code leaves the
    start as drawn."""
    x, y = torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():  # class 1 gains with every pixel: the loss of class 0 rises with every pixel
        model[1].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
        model[1].bias.zero_()
    eps = 0.3
    fgsm = create_method("fgsm", eps=eps).perturb(model, x, y)
    torch.testing.assert_close(fgsm, torch.full_like(x, eps))
    clamped = create_method("fgsm-rs", eps=eps, seed=3).perturb(model, x, y)
    torch.testing.assert_close(clamped, fgsm)
    drawn = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * eps
    free = create_method("fgsm-rs", eps=eps, seed=3, clamp_start=False).perturb(model, x, y)
    torch.testing.assert_close(free, (drawn + 1.25 * eps).clamp(max=eps))  # >= 0: already an image
    assert (free < eps - 1e-6).float().mean() > 0.3  # a start below -0.25 eps keeps the pixel inside the ball


def test_grey_noise_is_one_draw_per_pixel_shared_by_the_channels():
    x = torch.rand(64, 3, 8, 8)
    grey = create_method("fgsm-rs", eps=0.3, seed=4, grey_noise=True).uniform(x, 0.3)
    drawn = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1) * 0.3
    torch.testing.assert_close(grey, drawn.expand(64, 3, 8, 8))
    # what a network that averages the channels sees: the full U(-0.3, 0.3) variance (0.03), not a third of it
    independent = create_method("fgsm-rs", eps=0.3, seed=4).uniform(x, 0.3)
    assert grey.mean(1).var().item() == pytest.approx(0.3 ** 2 / 3, rel=0.1)
    assert independent.mean(1).var().item() == pytest.approx(0.3 ** 2 / 9, rel=0.1)


def test_gradalign_regulariser_is_zero_for_a_linear_model_and_positive_otherwise():
    x, y = _batch()
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    ga = create_method("gradalign", eps=EPS)
    # two classes, logits linear in x: the input gradient is (p - onehot) W, always along W0 - W1 with one sign
    assert ga.alignment(linear, x, y % 2).abs().max() < 1e-5
    assert ga.alignment(_cnn(), x, y).mean() > 1e-4


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown adversarial-training method 'fgsm2'.*n-fgsm"):
        create_method("fgsm2", eps=EPS)
    assert set(METHODS) == {"fgsm", "fgsm-rs", "n-fgsm", "gradalign", "pgd-at"}


def test_top_channel_share_on_a_known_activation():
    act = torch.zeros(2, 20, 3, 3)
    for c in range(20):
        act[:, c] = -(c + 1)  # mass of channel c is c + 1 (absolute values)
    assert top_channel_share(act) == pytest.approx((20 + 19) / 210)  # top 10% of 20 channels: 2 channels
    assert top_channel_share(torch.ones(4, 10, 2, 2)) == pytest.approx(0.1)
    one_hot = torch.zeros(1, 30, 2, 2)
    one_hot[:, 7] = 5.0
    assert top_channel_share(one_hot) == pytest.approx(1.0)


def test_robustness_check_on_a_linear_model():
    """A linear binary classifier: 10-step PGD ends on the FGSM corner (cosine 1, same accuracy), and FGSM's
    perturbation alone on grey never carries its label (it lowers that label's margin by construction)."""
    x, y = _batch()
    y = y % 2
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    linear[0].weight.data.abs_()
    with torch.no_grad():  # centre the model on grey so its decisions are about the perturbation
        linear[2].bias -= linear(torch.full((1, 3, 8, 8), 0.5))[0]
    r = robustness_check(linear, x, y, EPS, pgd_steps=10, layers=["0"], seed=0)
    assert r["fgsm_pgd_cos"] == pytest.approx(1.0, abs=1e-4)
    assert r["fgsm_acc"] == r["pgd_acc"]
    assert r["fgsm_pgd_gap"] == 0
    assert r["self_info_acc_proxy"] == 0.0
    assert 0.25 <= r["channel_share_clean_proxy"] <= 1.0  # one of 4 channels at least


def _levels(pgd, fgsm):
    return [{"pgd_acc": p, "fgsm_acc": f} for p, f in zip(pgd, fgsm)]


def _fired(pgd, fgsm, **kwargs) -> list[int]:
    detector = CODetector(**kwargs)
    return [i for i, level in enumerate(_levels(pgd, fgsm)) if detector.update(level) is not None]


# (PGD accuracy, FGSM accuracy) on the training batch at successive checks, and the checks where CO must be flagged
COLLAPSES = {
    "sharp collapse, FGSM rising": ([10, 20, 30, 35, 8, 2], [15, 25, 35, 40, 70, 80], [4]),
    "low peak (<= 20%, as on the demo)": ([8, 14, 18, 17, 6, 3], [10, 16, 21, 22, 30, 40], [4]),
    "collapse spread over three checks": ([30, 40, 33, 26, 19, 12], [35, 45, 47, 50, 55, 60], [4]),
    "FGSM dips at the collapse": ([25, 38, 40, 4, 3], [30, 44, 48, 37, 60], [3]),
}
NOT_COLLAPSES = {
    "smooth rise": ([10, 15, 20, 24, 27, 29], [12, 18, 24, 30, 34, 37]),
    "noisy plateau": ([18, 21, 19, 22, 18, 20], [25, 27, 24, 28, 26, 25]),
    "everything falls (a learning-rate spike)": ([30, 40, 10, 12], [40, 50, 20, 22]),
    "at chance": ([3, 1, 4, 0, 2], [4, 2, 5, 1, 3]),
}


@pytest.mark.parametrize("name", COLLAPSES)
def test_co_detector_flags_each_scripted_collapse_once(name):
    pgd, fgsm, expected = COLLAPSES[name]
    assert _fired(pgd, fgsm) == expected


@pytest.mark.parametrize("name", NOT_COLLAPSES)
def test_co_detector_stays_quiet_without_a_collapse(name):
    assert _fired(*NOT_COLLAPSES[name]) == []


def test_the_previous_rule_missed_three_of_the_four_collapses():
    """The old detector (a > 20-point fall since the previous check while FGSM rose) on the same curves: it caught
    only the sharp collapse, which is why the rule changed."""
    def old_rule(pgd, fgsm):
        return [i for i in range(1, len(pgd)) if pgd[i - 1] - pgd[i] > 20 and fgsm[i] > fgsm[i - 1]]

    caught = {name: old_rule(pgd, fgsm) == expected for name, (pgd, fgsm, expected) in COLLAPSES.items()}
    assert caught == {"sharp collapse, FGSM rising": True, "low peak (<= 20%, as on the demo)": False,
                      "collapse spread over three checks": False, "FGSM dips at the collapse": False}


class _ScriptedMonitor(COMonitor):
    """The response logic under test; the measured accuracies are scripted."""

    script: list = None

    def check(self, step, model):
        current = self.script[len(self.history)]
        return {"step": step, "co": 0, **current}, current


def test_rollback_restores_the_last_good_weights_exactly_and_scales_the_step():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    method = create_method("fgsm", eps=EPS)
    events = []
    mon = _ScriptedMonitor(method=method, train_batch=None, val_batch=None, eps=EPS, every=1, response="rollback",
                           step_factor=0.5, on_event=events.append)
    mon.script = _levels([30, 35, 5], [40, 45, 90])
    x, y = _batch()

    def train_step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    train_step()
    mon(1, model, opt)
    train_step()
    mon(2, model, opt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    good_momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    train_step()
    mon(3, model, opt)  # collapse: back to step 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), good_momentum))
    assert method.step == pytest.approx(EPS / 2)
    assert [e["step"] for e in events] == [3] and events[0]["restored_step"] == 2
    assert [r["co"] for r in mon.history] == [0, 0, 1]


def _train_watched(mon, model, opt, steps: int) -> dict[int, dict[str, torch.Tensor]]:
    """``steps`` SGD steps on one batch, the monitor called after each; the weights after each step (before the
    monitor's response), by step."""
    x, y = _batch()
    weights = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        mon(step, model, opt)
    return weights


def test_rollback_after_a_slow_collapse_returns_to_the_peak_not_to_the_check_before_the_alarm():
    """co-mnist's FGSM seed 1 lost its robustness over several checks (PGD 54 -> 47 -> 36 -> 29): the check before
    the alarm had already lost most of it, so the rollback goes back to the peak's weights."""
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = _ScriptedMonitor(method=create_method("fgsm", eps=EPS), train_batch=None, val_batch=None, eps=EPS, every=1,
                           response="rollback", step_factor=0.5)
    mon.script = _levels([30, 54, 47, 36, 25], [60, 88, 90, 92, 95])
    weights = _train_watched(mon, model, opt, steps=5)
    assert [e["restored_step"] for e in mon.events] == [2] and mon.events[0]["step"] == 5
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights[2].items())


@pytest.mark.parametrize("response", ["rollback", "log"])
def test_a_rolled_back_run_that_does_not_recover_ends_on_its_most_robust_weights(response):
    """After the rollback to step 2 the run recovers to 40 (a new running peak of the detector, still below 54) and
    ends at 38: with rollback it ends on step 2's weights; logging alone never changes the weights."""
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = _ScriptedMonitor(method=create_method("fgsm", eps=EPS), train_batch=None, val_batch=None, eps=EPS, every=1,
                           response=response, step_factor=0.5)
    mon.script = _levels([30, 54, 47, 36, 25, 40, 38], [60, 88, 90, 92, 95, 85, 86])
    weights = _train_watched(mon, model, opt, steps=7)
    kept = mon.keep_robust(model)
    assert [e["step"] for e in mon.events] == [5]
    if response == "rollback":
        assert kept == 2 and all(torch.equal(model.state_dict()[k], v) for k, v in weights[2].items())
    else:
        assert kept is None and all(torch.equal(model.state_dict()[k], v) for k, v in weights[7].items())


def test_a_run_without_collapse_or_that_recovers_past_its_peak_keeps_its_last_weights():
    for pgd in ([30, 40, 45, 44], [30, 54, 25, 60]):  # no CO; CO at step 3, then above the old peak
        model = _cnn()
        mon = _ScriptedMonitor(method=create_method("fgsm", eps=EPS), train_batch=None, val_batch=None, eps=EPS,
                               every=1, response="rollback")
        mon.script = _levels(pgd, [60, 88, 95, 90])
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        weights = _train_watched(mon, model, opt, steps=4)
        assert mon.keep_robust(model) is None
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights[4].items())  # the last step's weights


def test_the_page_names_the_rollback_target_and_the_step_a_run_ended_on():
    from evaluators.downstream_report import co_events_cell

    run = {"co_events": [{"step": 1850, "restored_step": 1150}], "kept_step": 1150}
    assert co_events_cell(run) == "step 1850 (back to step 1150); ends on step 1150"
    assert co_events_cell({"co_events": [{"step": 5}, {"step": 9}]}) == "step 5, step 9"
    assert co_events_cell({"co_events": []}) == "none"


def test_snapshot_is_a_copy_not_a_view():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = snapshot(0, model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    restore(model, opt, saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_adv_train_stage_on_the_small_world(small_world, prefect_server, tmp_path):
    from model_zoo.spec import ModelSpec
    from model_zoo.zoo import build_model
    from pipelines.config import AdvTrain
    from pipelines.flows.adv_train import adv_train_flow
    from pipelines.stages import DownstreamPaths, read_models_file
    from sources.reading import load_split
    from training.supervised import accuracy

    cfg = AdvTrain(**{
        "model": "tiny", "train_root": str(small_world / "train"), "val_root": str(small_world / "val"),
        "seed": 0, "mix_shards": None,
        "recipe": {"epochs": 2, "lr": 0.1, "batch_size": 100, "optimizer": "sgd", "weight_decay": 5e-4,
                   "schedule": "cyclic", "warmup_epochs": 0, "label_smoothing": 0.0},
        "monitor": {"every": 3, "n": 32, "pgd_steps": 3, "drop": 0.5, "min_drop": 5.0, "response": "log"},
        "runs": {"fgsm": {"method": "fgsm", "eps": 16}, "n-fgsm": {"method": "n-fgsm", "eps": 16}},
        "final_eval": {"pgd_steps": 3, "restarts": 2, "n": 50},
    })
    spec = ModelSpec(name="tiny", arch="test_resnet", num_classes=10, data={"input_size": [3, 32, 32], "crop_pct": 1.0})
    metrics = adv_train_flow(cfg, spec, DownstreamPaths(tmp_path / "adv", tmp_path / "m.json", tmp_path / "reports",
                                                        tmp_path / "plots"))
    assert set(metrics) == {"fgsm", "n-fgsm"}
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(metrics))
    specs = read_models_file(tmp_path / "adv" / "models.json")
    assert [s.name for s in specs] == ["at-fgsm", "at-n-fgsm"]
    xv, yv, _ = load_split(small_world / "val", 32)
    # the saved checkpoint is the trained model: the evaluate stage rebuilds it from the spec
    assert accuracy(build_model(specs[0]), xv, yv) == pytest.approx(metrics["fgsm"]["val_acc"], abs=0.01)
    from evaluators.white_box import pgd_robust_accuracy
    from pipelines.flows.adv_train import fixed_subset

    subset = fixed_subset(xv, yv, 50, 2)  # the white-box check's val subset (seed + 2)
    white_box = pgd_robust_accuracy(build_model(specs[0]), *subset, 16 / 255, steps=3, restarts=2)
    assert metrics["fgsm"]["white_box_val_acc"] == pytest.approx(white_box, abs=0.01)
    assert white_box <= accuracy(build_model(specs[0]), (subset[0] * 255).round().to(torch.uint8), subset[1])
    rows = list(csv.DictReader(open(tmp_path / "plots" / "fgsm.csv")))
    assert list(rows[0])[-1] == "train_pgd_acc"  # the column DVC plots as y
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]  # 600 images / 100 = 6 steps per epoch, 2 epochs
    assert all(0 <= float(r["val_pgd_acc"]) <= 100 and math.isfinite(float(r["train_channel_share_fgsm_proxy"]))
               for r in rows)
    page = (tmp_path / "reports" / "adv_train" / "index.md").read_text()
    assert "proxies" in page and "| fgsm | fgsm | 16/255 |" in page
    assert "white-box PGD-3 x2 val acc" in page and "Control for the self-fitting proxies" in page
    assert (tmp_path / "reports" / "adv_train" / "curves.png").stat().st_size > 10_000


def test_gradalign_loss_is_fgsm_cross_entropy_plus_the_weighted_alignment():
    x, y = _batch()
    model = _cnn()
    ga = create_method("gradalign", eps=EPS, lam=0.7)
    delta = create_method("fgsm", eps=EPS).perturb(model, x, y)
    ce = nn.functional.cross_entropy(model(x + delta), y)
    ga.gen.manual_seed(5)
    alignment = ga.alignment(model, x, y).mean()
    ga.gen.manual_seed(5)
    torch.testing.assert_close(ga.loss(model, x, y), ce + 0.7 * alignment)


def test_shard_images_mix_in_every_image_and_label(tmp_path):
    import numpy as np

    from shards.shardset import write_shard
    from training.data import shard_images

    rng = np.random.default_rng(0)
    samples = [{"key": f"k{i}", "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "cls": i % 3, "json": {}}
               for i in range(5)]
    (tmp_path / "set").mkdir()
    write_shard(tmp_path / "set" / "s-000000.tar", samples[:3])
    write_shard(tmp_path / "set" / "s-000001.tar", samples[3:])
    images, labels = shard_images([str(tmp_path / "set")])
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images[4], torch.from_numpy(samples[4]["image"]).permute(2, 0, 1))
    assert labels.tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="no samples"):
        (tmp_path / "empty").mkdir()
        shard_images([str(tmp_path / "empty")])


def test_gradalign_treats_the_clean_gradient_as_a_constant_as_the_official_code():
    """Parameter gradients of the regulariser equal a by-hand version with the clean-input gradient detached and
    differ from the version that backpropagates through it too."""
    from training.adversarial.base import input_gradient

    x, y = _batch()
    model = _cnn()
    ga = create_method("gradalign", eps=EPS)

    def param_grads(detach_clean: bool):
        ga.gen.manual_seed(3)
        g_clean = input_gradient(model, x.clone().requires_grad_(True), y, create_graph=not detach_clean)
        g_clean = g_clean.detach() if detach_clean else g_clean
        noisy = (x + ((x + (torch.rand(x.shape, generator=ga.gen) * 2 - 1) * EPS).clamp(0, 1) - x)).requires_grad_(True)
        g_noisy = input_gradient(model, noisy, y, create_graph=True)
        value = (1 - nn.functional.cosine_similarity(g_clean.flatten(1), g_noisy.flatten(1), dim=1, eps=1e-12)).mean()
        return torch.autograd.grad(value, list(model.parameters()))

    ga.gen.manual_seed(3)
    ours = torch.autograd.grad(ga.alignment(model, x, y).mean(), list(model.parameters()))
    for a, b in zip(ours, param_grads(detach_clean=True)):
        torch.testing.assert_close(a, b)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(ours, param_grads(detach_clean=False)))


def test_fgsm_rs_start_is_clamped_to_the_image_as_wong_et_al():
    """Wong et al.'s loop, written out: delta ~ U(-eps, eps) clamped so x + delta is an image, one step of alpha,
    projection to the eps ball and the image. On a near-white image the unclamped start would differ."""
    from training.adversarial.base import input_gradient

    x, y = _batch()
    x = (x * 0.1 + 0.9)  # near the top of the range: starts would leave the image
    model = _cnn()
    rs = create_method("fgsm-rs", eps=EPS, seed=4)
    gen = torch.Generator().manual_seed(4)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * EPS
    delta = torch.max(torch.min(delta, 1 - x), -x)
    delta = (delta + 1.25 * EPS * input_gradient(model, x + delta, y).sign()).clamp(-EPS, EPS)
    expected = torch.max(torch.min(delta, 1 - x), -x)
    torch.testing.assert_close(rs.perturb(model, x, y), expected, rtol=0, atol=1e-7)


def _binary_linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))


def test_white_box_pgd_matches_the_closed_form_worst_case_of_a_linear_model():
    """For a binary linear model the worst case in the eps ball (away from the image bounds) is known exactly:
    an image survives iff its margin exceeds eps * ||w_y - w_other||_1."""
    from evaluators.white_box import pgd_robust_accuracy

    x, y = _batch()
    x = 0.3 + 0.4 * x  # in [0.34, 0.66]: the eps ball never touches 0 or 1
    y = y % 2
    model = _binary_linear()
    w, b = model[1].weight.detach(), model[1].bias.detach()
    logits = x.flatten(1) @ w.T + b
    margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, 1 - y[:, None])[:, 0]
    dual_norm = (w[y] - w[1 - y]).abs().sum(1)
    expected = {eps: 100.0 * (margin > eps * dual_norm).float().mean().item() for eps in (0.02, 0.039, 0.05)}
    assert len(set(expected.values())) == 3  # the three budgets break different numbers of images
    for eps, acc in expected.items():
        assert pgd_robust_accuracy(model, x, y, eps, steps=10) == pytest.approx(acc)


def test_white_box_pgd_is_at_least_as_strong_as_the_last_iterate_and_restarts_only_help():
    from evaluators.white_box import pgd_robust_accuracy
    from training.adversarial.base import linf_pgd

    x, y = _batch()
    model = _cnn().eval()
    eps = 16 / 255
    with torch.no_grad():
        clean = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    delta = linf_pgd(model, x, y, eps, eps / 4, 5, random_start=True, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last_iterate = 100.0 * (model(x + delta).argmax(1) == y).float().mean().item()
    one = pgd_robust_accuracy(model, x, y, eps, steps=5, restarts=1, seed=0)
    assert one <= last_iterate <= clean  # same start (same seed, same draw order): every iterate is also checked
    assert pgd_robust_accuracy(model, x, y, eps, steps=5, restarts=3, seed=0) <= one
    # a vanishing budget leaves the clean accuracy, whatever the batching
    assert pgd_robust_accuracy(model, x, y, 1e-6, steps=2, batch_size=5) == pytest.approx(clean)
    with pytest.raises(ValueError, match="restarts"):
        pgd_robust_accuracy(model, x, y, eps, restarts=0)


def test_self_fitting_control_compares_the_proxies_of_co_and_non_co_runs():
    from evaluators.downstream_report import _self_info_control

    def run(events, self_info, share):
        m = {"co_events": [{"step": 5}] * events, "final_val_fgsm_acc": 60.0, "final_val_pgd_acc": 10.0}
        h = [{"train_self_info_acc_proxy": 10.0, "train_channel_share_fgsm_proxy": 0.2},
             {"train_self_info_acc_proxy": self_info, "train_channel_share_fgsm_proxy": share}]
        return m, h

    def control(**runs):
        return _self_info_control({n: r[0] for n, r in runs.items()}, {n: r[1] for n, r in runs.items()})

    text = control(fgsm=run(1, 80.0, 0.5), pgd=run(0, 30.0, 0.6))
    assert "self-information proxy is higher in every CO run" in text
    assert "channel share does not separate" in text
    assert "| fgsm | CO | 50.0 | 10.0 -> 80.0 | 50.0 |" in text
    assert "self-information proxy does not separate" in control(fgsm=run(1, 80.0, 0.5), pgd=run(0, 85.0, 0.6))
    assert "cannot tell" in control(fgsm=run(0, 80.0, 0.5), pgd=run(0, 30.0, 0.6))


def test_a_run_at_chance_is_named_and_left_out_of_the_co_claim(tmp_path):
    from evaluators.downstream_report import adv_training_section
    from pipelines.config import Monitor

    def run(method, val_acc, pgd):
        h = [{"step": s, "train_pgd_acc": p, "val_pgd_acc": p, "train_fgsm_acc": p + 5, "train_clean_acc": val_acc,
              "train_self_info_acc_proxy": 10.0, "train_channel_share_fgsm_proxy": 0.2,
              "train_channel_share_clean_proxy": 0.2} for s, p in zip((10, 20, 30), pgd)]
        m = {"method": method, "eps": 16, "val_acc": val_acc, "final_val_pgd_acc": pgd[-1],
             "final_val_fgsm_acc": pgd[-1] + 5, "co_events": [], "train_seconds": 1.0}
        return m, h

    runs = {"fgsm": run("fgsm", 70.0, [10, 20, 30]), "gradalign": run("gradalign", 12.0, [9, 10, 11])}
    monitor = Monitor(every=10, n=8, pgd_steps=3, drop=0.5, min_drop=5.0)
    page = adv_training_section({n: r[0] for n, r in runs.items()}, {n: r[1] for n, r in runs.items()}, monitor,
                                None, tmp_path, chance=10.0)
    assert "| gradalign (at chance: not ranked) | gradalign |" in page and "| fgsm | fgsm |" in page
    assert "no run of each kind" in page  # the only guarded run learned nothing: no claim from it
    unmarked = adv_training_section({n: r[0] for n, r in runs.items()}, {n: r[1] for n, r in runs.items()}, monitor,
                                    None, tmp_path)
    assert "at chance" not in unmarked and "no run of each kind" not in unmarked


def test_co_detector_with_min_peak_ignores_the_wobble_at_chance_and_still_flags_the_collapse_from_a_robust_peak():
    """MNIST at eps 0.25 (co-mnist): the first checks sit at chance (10 classes) and wobble by more than min_drop,
    which the plain rule reads as a collapse; with min_peak 20 only the fall from the robust peak counts."""
    pgd = [11, 4, 17, 37, 44, 43, 30, 19]
    fgsm = [11, 11, 46, 80, 86, 88, 92, 95]
    assert _fired(pgd, fgsm) == [1, 7]
    assert _fired(pgd, fgsm, min_peak=20) == [7]
