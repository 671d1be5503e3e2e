"""Unlearning: MUSO's exact-unlearning theory, NatMU's hybrids, SFR-on's mask and schedule, the MIA protocol,
the scenarios, and the stage end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from evaluators.unlearning import avg_gap, divergences, mia
from model_zoo.spec import ModelSpec
from model_zoo.zoo import build_model
from pipelines.config import Scenario, Unlearn
from pipelines.flows.unlearn import forget_indices
from training.unlearning import METHODS, UnlearningData, create_method
from training.unlearning.linear import exact_unlearning_check
from training.unlearning.muso import optimal_forget_labels
from training.unlearning.natmu import build_hybrids, pattern_masks
from training.unlearning.sfr_on import SFROn, diagonal_fisher, fisher_saliency_mask, loss_weights, schedule


@pytest.mark.parametrize("n,p,forget,seed", [(60, 600, 12, 0), (30, 200, 3, 1)])
def test_muso_labels_unlearn_exactly_in_the_linear_model(n, p, forget, seed):
    d = exact_unlearning_check(n=n, p=p, forget=forget, seed=seed)
    assert d["muso_labels"] < 1e-6
    assert d["random_labels"] > 1e-2 and d["no_relabelling"] > 1e-2


def test_muso_labels_are_the_retrained_min_norm_predictions():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 80, generator=g, dtype=torch.float64)
    y = torch.randn(20, 3, generator=g, dtype=torch.float64)
    w0 = torch.randn(80, 3, generator=g, dtype=torch.float64)
    zr, yr, zu = z[5:], y[5:], z[:5]
    retrained = w0 + torch.linalg.pinv(zr) @ (yr - zr @ w0)  # the interpolant of the remaining data closest to w0
    torch.testing.assert_close(optimal_forget_labels(zu, zr, yr, w0, eps=0.0), zu @ retrained)


def test_muso_labels_primal_and_dual_forms_agree_with_a_ridge():
    g = torch.Generator().manual_seed(1)
    zr, zu = torch.randn(50, 8, generator=g), torch.randn(4, 8, generator=g)  # fewer features than samples
    yr = torch.randn(50, 3, generator=g, dtype=torch.float64)
    w0 = torch.randn(8, 3, generator=g, dtype=torch.float64)
    dual = zu.double() @ w0 + zu.double() @ zr.double().T @ torch.linalg.solve(
        zr.double() @ zr.double().T + 0.3 * torch.eye(50, dtype=torch.float64), yr - zr.double() @ w0)
    torch.testing.assert_close(optimal_forget_labels(zu, zr, yr, w0, eps=0.3), dual)


def _tiny(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelSpec(name="t", arch="test_resnet", num_classes=num_classes,
                                 data={"input_size": [3, 16, 16], "crop_pct": 1.0}))


def _data(num_classes=5, n_forget=6, n_remain=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    xf = torch.randint(0, 256, (n_forget, 3, 16, 16), generator=g, dtype=torch.uint8)
    xr = torch.randint(0, 256, (n_remain, 3, 16, 16), generator=g, dtype=torch.uint8)
    yf = torch.randint(0, num_classes, (n_forget,), generator=g)
    yr = torch.arange(n_remain) % num_classes
    return UnlearningData((xf, yf), (xr, yr), num_classes)


@pytest.mark.parametrize("size,delta", [(32, -0.19), (16, 0.0), (64, 0.3)])
def test_natmu_patterns_follow_the_official_per_row_loop(size, delta):
    """The authors' construction written as their loop: two halves of b rows (or columns), j/b rising in one and
    (b-1)/b - j/b falling in the other, the inverted pair swapping them; plus delta, clipped to [0, 1]."""
    b = size // 2
    naive = torch.zeros(4, size, size)
    for i in range(2):
        for j in range(b):
            up, down = j / b, (b - 1) / b - j / b
            first, second = (up, down) if i % 2 == 0 else (down, up)
            naive[0, i * b + j, :] = first
            naive[1, :, i * b + j] = first
            naive[2, i * b + j, :] = second
            naive[3, :, i * b + j] = second
    torch.testing.assert_close(pattern_masks(size, delta), (naive + delta).clamp(0, 1))


def test_natmu_default_pattern_leaves_the_forgetting_image_about_thirty_percent():
    # CIFAR-10 script's delta -0.19 at 32 px: mean of max(j/16 - 0.19, 0) over j = 0..15
    expected = sum(max(j / 16 - 0.19, 0) for j in range(16)) / 16
    assert pattern_masks(32).mean((1, 2)).tolist() == pytest.approx([expected] * 4, abs=1e-6)
    assert 0.29 < expected < 0.31


def test_natmu_hybrids_come_from_the_top_wrong_classes_with_the_stated_share():
    model, data = _tiny(), _data()
    hybrids, labels, records = build_hybrids(model, data, seed=0)
    (xf, yf), (_, yr) = data.forget, data.remain
    with torch.no_grad():
        logits = model(xf.float() / 255)
    for i in range(len(xf)):
        ranked = [c for c in logits[i].argsort(descending=True).tolist() if c != yf[i].item()][:4]
        mine = [r for r in records if r["forget"] == i]
        assert [r["label"] for r in mine] == ranked  # the original model's top-4 wrong classes, in order
        assert [r["pattern"] for r in mine] == [0, 1, 2, 3]  # the k-th wrong class gets the k-th pattern
        for r in mine:
            assert yr[r["partner"]].item() == r["label"]  # a remaining image of that class
    assert len(hybrids) == len(labels) == 4 * len(xf)
    assert labels.tolist() == [r["label"] for r in records]


def test_hybrid_pixels_blend_forget_and_partner_images_through_the_pattern():
    model, data = _tiny(), _data()
    hybrids, _, records = build_hybrids(model, data, seed=0)
    (xf, _), (xr, _) = data.forget, data.remain
    masks = pattern_masks(16)
    for r, h in zip(records, hybrids):
        m = masks[r["pattern"]]
        expected = (m * xf[r["forget"]].float() + (1 - m) * xr[r["partner"]].float()).round()
        torch.testing.assert_close(h.float(), expected, atol=0, rtol=0)


def test_fisher_matches_a_naive_per_sample_loop_and_the_mask_is_the_ratio_test():
    model, data = _tiny(), _data()
    (xf, yf), (xr, yr) = data.forget, data.remain
    fisher = diagonal_fisher(model, xf, yf)
    naive = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(xf)):
        model.zero_grad()
        nn.functional.cross_entropy(model(xf[i : i + 1].float() / 255), yf[i : i + 1]).backward()
        for n, p in model.named_parameters():
            naive[n] += p.grad**2 / len(xf)
    for n in naive:
        torch.testing.assert_close(fisher[n], naive[n], rtol=1e-4, atol=1e-12)
    f_remain = diagonal_fisher(model, xr, yr)
    mask = fisher_saliency_mask(model, (xf, yf), (xr, yr), gamma=1.0)
    for n in mask:
        assert torch.equal(mask[n], (fisher[n] >= f_remain[n]).float())
    assert 0 < sum(m.sum() for m in mask.values()) < sum(m.numel() for m in mask.values())


def test_fisher_over_batches_is_the_official_codes_squared_batch_gradient():
    """The official SFR-on code squares the gradient of each mini-batch's mean loss and averages over batches."""
    model, data = _tiny(), _data()
    xr, yr = data.remain
    naive = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = [(i, min(i + 16, len(xr))) for i in range(0, len(xr), 16)]  # 16, 16 and a last batch of 8
    for a, b in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(xr[a:b].float() / 255), yr[a:b]).backward()
        for n, p in model.named_parameters():
            naive[n] += p.grad**2 / len(batches)
    fisher = diagonal_fisher(model, xr, yr, batch_size=16)
    for n in naive:
        torch.testing.assert_close(fisher[n], naive[n], rtol=1e-4, atol=1e-12)
    per_sample = diagonal_fisher(model, xr, yr)
    assert not all(torch.allclose(fisher[n], per_sample[n]) for n in fisher)  # a different estimate


def test_sfr_on_forgets_before_retaining_and_anneals_the_learning_rate_by_cosine():
    calls = []

    class Spy(SFROn):
        def forget_step(self, model, opt, x, y, alpha, masks):
            calls.append(("forget", opt.param_groups[0]["lr"], alpha))
            super().forget_step(model, opt, x, y, alpha, masks)

        def retain_step(self, model, opt, x, y):
            calls.append(("retain", opt.param_groups[0]["lr"]))
            super().retain_step(model, opt, x, y)

    Spy(recipe={"iterations": 10, "batch_size": 8, "fisher_samples": 8, "fisher_batch": 4}).unlearn(_tiny(), _data())
    assert [c[0] for c in calls[:3]] == ["forget", "retain", "retain"]  # iteration 0 forgets first
    retain_lrs = [c[1] for c in calls if c[0] == "retain"]
    assert retain_lrs == pytest.approx([0.01 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)])
    assert [c[2] for c in calls if c[0] == "forget"] == pytest.approx([25.0, 25.0 * (1 + math.cos(math.pi / 2)) / 2])


def test_sfr_on_schedule_and_sample_weights():
    steps = schedule(20, forget_every=5, alpha0=25.0)
    assert [t for t, (forget, _) in enumerate(steps) if forget] == [0, 5, 10, 15]
    alphas = [a for _, a in steps]
    assert alphas[0] == 25.0 and alphas[10] == pytest.approx(12.5)
    assert all(a > b for a, b in zip(alphas, alphas[1:]))  # cosine decay
    losses = torch.tensor([0.25, 1.0, 4.0])
    w = loss_weights(losses)
    assert w.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(w / w[1], torch.tensor([2.0, 1.0, 0.5]))  # proportional to loss^-0.5


def test_sfr_on_forget_step_moves_only_salient_weights_with_clipped_gradient():
    model, data = _tiny(), _data()
    (xf, yf), (xr, yr) = data.forget, data.remain
    masks = fisher_saliency_mask(model, (xf, yf), (xr, yr))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    SFROn().forget_step(model, opt, xf, yf, alpha=25.0, masks=masks)
    moved = 0
    total_sq = 0.0
    for n, p in model.named_parameters():
        step = p.detach() - before[n]  # lr 1: the step is minus the (masked, clipped) gradient
        assert torch.equal(step[masks[n] == 0], torch.zeros_like(step[masks[n] == 0]))
        moved += (step[masks[n] == 1] != 0).sum().item()
        total_sq += step.pow(2).sum().item()
    assert moved > 0
    assert total_sq**0.5 == pytest.approx(7.0, rel=1e-3)  # alpha 25 makes the raw gradient large: clipped to 7


def test_mia_attacks_are_fit_on_remaining_and_test_only():
    g = torch.Generator().manual_seed(0)

    def outputs(conf, n):
        logits = torch.randn(n, 4, generator=g)
        labels = torch.randint(0, 4, (n,), generator=g)
        logits[torch.arange(n), labels] += conf
        return logits.softmax(1), labels

    remain, test = outputs(6.0, 300), outputs(1.0, 100)
    a = mia({"remain": remain, "test": test, "forget": outputs(6.0, 50)})
    b = mia({"remain": remain, "test": test, "forget": outputs(0.0, 50)})
    for k in ("mia_efficacy_attack", "mia_member_rate_attack"):  # the forget set changes nothing in the attack
        assert a[k].coef_.tolist() == b[k].coef_.tolist() and a[k].intercept_ == b[k].intercept_
    assert a["mia_efficacy"] < 30 < 70 < b["mia_efficacy"]  # member-like forget samples look like members
    assert a["mia_member_rate"] > 70 > 30 > b["mia_member_rate"]


def test_gap_and_divergences_by_hand():
    assert avg_gap({"UA": 10, "RA": 90, "TA": 80, "MIA": 20}, {"UA": 14, "RA": 92, "TA": 80, "MIA": 10}) == 4.0
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.9, 0.1]])
    d = divergences(p, q)
    kl = 0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1))
    assert d["KL"] == pytest.approx(kl.item(), abs=1e-4)
    assert divergences(p, p) == {"KL": 0.0, "JS": 0.0}
    assert 0 < d["JS"] < torch.log(torch.tensor(2.0)).item()


def test_forget_scenarios():
    from pydantic import ValidationError

    def scenario(**given):
        return Scenario.model_validate(given)

    labels = torch.arange(1000) % 10
    one = forget_indices(labels, scenario(kind="random", fraction=0.01), seed=0)
    ten = forget_indices(labels, scenario(kind="random", fraction=0.10), seed=0)
    assert len(one) == 10 and len(ten) == 100 and len(set(ten.tolist())) == 100
    assert torch.equal(ten, forget_indices(labels, scenario(kind="random", fraction=0.10), seed=0))
    assert not torch.equal(ten, forget_indices(labels, scenario(kind="random", fraction=0.10), seed=1))
    cls = forget_indices(labels, Scenario.model_validate({"kind": "class", "class": 3}), seed=0)
    assert (labels[cls] == 3).all() and len(cls) == 100
    with pytest.raises(ValueError, match="no training sample of class 11"):
        forget_indices(labels, Scenario.model_validate({"kind": "class", "class": 11}), seed=0)
    with pytest.raises(ValidationError, match="a class scenario gives class"):  # the schema says what is missing
        scenario(kind="class", fraction=0.1)
    assert set(METHODS) == {"ft", "ga", "rl", "salun", "natmu", "sfr-on", "muso"}
    with pytest.raises(ValueError, match="unknown unlearning method 'scrub'"):
        create_method("scrub")


def test_salun_mask_keeps_half_the_weights_and_freezes_the_rest():
    from training.unlearning.salun import gradient_saliency_mask

    model, data = _tiny(), _data()
    masks = gradient_saliency_mask(model, *data.forget, share=0.5)
    kept = sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.5, abs=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    create_method("salun", {"epochs": 1, "lr": 1e-2, "batch_size": 16, "weight_decay": 0.0, "shift": 0}).unlearn(model, data)
    for n, p in model.named_parameters():
        frozen = masks[n] == 0
        assert torch.equal(p.detach()[frozen], before[n][frozen])


def test_every_method_changes_the_model_and_keeps_it_finite():
    data = _data()
    for name in METHODS:
        model = _tiny()
        before = [p.detach().clone() for p in model.parameters()]
        recipe = {"ga": {"epochs": 1, "lr": 1e-3, "batch_size": 16},
                  "sfr-on": {"iterations": 5, "lr": 1e-3, "batch_size": 16, "fisher_samples": 8}
                  }.get(name, {"epochs": 1, "lr": 1e-3, "batch_size": 16})
        create_method(name, recipe).unlearn(model, data)
        params = list(model.parameters())
        assert any(not torch.equal(p, b) for p, b in zip(params, before)), name
        assert all(torch.isfinite(p).all() for p in params), name


@pytest.mark.slow
def test_unlearn_stage_on_the_small_world(trained_zoo, small_world, prefect_server, tmp_path):
    from pipelines.flows.unlearn import unlearn_flow
    from pipelines.stages import DownstreamPaths

    spec = next(s for s in trained_zoo["zoo"].specs() if s.name == "resnet10t")
    cfg = Unlearn(**{"model": "resnet10t", "train_root": str(small_world / "train"), "val_root": str(small_world / "val"),
           "seed": 0, "scenarios": {"class-2": {"kind": "class", "class": 2}},
           "recipe": {"epochs": 1, "lr": 0.001, "weight_decay": 0.0, "batch_size": 64},
           "methods": {"ft": {}, "muso": {}}, "seeds": [0, 1], "mia_attack": "logistic"})
    results = unlearn_flow(cfg, spec, {"epochs": 1, "lr": 0.002},
                           DownstreamPaths(tmp_path / "unlearn", tmp_path / "unlearn.json", tmp_path / "reports",
                                           tmp_path / "plots"))
    rows = results["class-2"]
    assert list(rows) == ["retrain", "original", "ft", "muso"]
    assert rows["retrain"]["avg_gap"] == 0.0
    assert rows["retrain"]["UA"] == 100.0  # a model that never saw class 2 cannot name it
    assert rows["original"]["UA"] < 50  # the original still knows it
    assert json.loads((tmp_path / "unlearn.json").read_text()) == json.loads(json.dumps(results))
    assert all((tmp_path / "unlearn" / "class-2" / f"muso-seed{s}.safetensors").is_file() for s in (0, 1))
    assert rows["ft"]["seeds"] == 2 and rows["ft"]["RA_std"] >= 0 and "seeds" not in rows["retrain"]
    page = (tmp_path / "reports" / "unlearn" / "index.md").read_text()
    assert "| muso |" in page and "Avg Gap" in page
    assert f"| ft | {rows['ft']['UA']:.1f} ± {rows['ft']['UA_std']:.1f} |" in page  # methods as mean ± std over seeds
    assert "## class-2: forget every training image of class 2\n" in page and "{'kind'" not in page  # words, no repr


def test_mia_attack_accuracy_is_chance_when_members_and_nonmembers_look_alike():
    labels = torch.zeros(400, dtype=torch.long)
    confident = torch.tensor([[0.97, 0.03]]).repeat(400, 1)
    same = mia({"remain": (confident[:300], labels[:300]), "test": (confident[300:], labels[300:]),
                "forget": (confident[:50], labels[:50])})
    assert same["mia_efficacy_attack_balanced_acc"] == 50.0  # identical confidences: one side is always wrong
    unsure = torch.tensor([[0.4, 0.6]]).repeat(100, 1)
    separable = mia({"remain": (confident[:300], labels[:300]), "test": (unsure, labels[300:]),
                     "forget": (confident[:50], labels[:50])})
    assert separable["mia_efficacy_attack_balanced_acc"] == 100.0
    assert separable["mia_efficacy"] == 0.0  # forget samples as confident as members: all called members


def test_mia_features_are_float64_because_float32_confidences_round_to_one():
    """Members at logit margin 20, non-members at 17: in float32 both confidences are exactly 1.0 and the attack
    is at chance; in float64 it separates them. ``unlearning_metrics`` must hand the attack float64."""
    from evaluators.unlearning import unlearning_metrics

    labels = torch.zeros(200, dtype=torch.long)

    def logits(margin):
        return torch.tensor([[margin, 0.0]]).repeat(100, 1)

    for dtype, expected in ((torch.float32, 50.0), (torch.float64, 100.0)):
        out = {"remain": (logits(20.0).to(dtype).softmax(1), labels[:100]),
               "test": (logits(17.0).to(dtype).softmax(1), labels[100:]), "forget": (logits(20.0).softmax(1), labels[:100])}
        assert mia(out)["mia_efficacy_attack_balanced_acc"] == expected, dtype

    class Margin(torch.nn.Module):  # logit margin = 20 x the image's mean intensity in [0,1]
        def forward(self, x):
            m = x.mean((1, 2, 3)) * 20
            return torch.stack([m, torch.zeros_like(m)], 1)

    members = torch.full((100, 3, 4, 4), 255, dtype=torch.uint8)
    nonmembers = torch.full((100, 3, 4, 4), 217, dtype=torch.uint8)  # margin 17.0
    metrics, probs = unlearning_metrics(Margin(), (members[:20], labels[:20]), (members, labels[:100]),
                                        (nonmembers, labels[100:]))
    assert probs.dtype == torch.float64 and metrics["MIA_attack_acc"] == 100.0 and metrics["MIA"] == 0.0


def test_an_attack_at_chance_gives_no_mia_and_avg_gap_leaves_it_out():
    from evaluators.unlearning import unlearning_metrics

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[3.0, 0.0]]).repeat(len(x), 1)

    images, labels = torch.zeros(100, 3, 4, 4, dtype=torch.uint8), torch.zeros(100, dtype=torch.long)
    metrics, _ = unlearning_metrics(Constant(), (images[:10], labels[:10]), (images, labels), (images, labels))
    assert metrics["MIA_attack_acc"] == 50.0 and metrics["MIA"] is None and metrics["MIA_member_rate"] is None
    assert avg_gap({"UA": 10, "RA": 90, "TA": 80, "MIA": None}, {"UA": 14, "RA": 92, "TA": 80, "MIA": 10}) == 2.0


def test_svc_attack_option_separates_what_it_should_and_unknown_attacks_are_named():
    labels = torch.zeros(400, dtype=torch.long)
    confident, unsure = torch.tensor([[0.97, 0.03]]).repeat(300, 1), torch.tensor([[0.4, 0.6]]).repeat(100, 1)
    out = {"remain": (confident, labels[:300]), "test": (unsure, labels[300:]), "forget": (unsure[:50], labels[:50])}
    svc = mia(out, attack="svc")
    assert svc["mia_efficacy_attack_balanced_acc"] == 100.0 and svc["mia_efficacy"] == 100.0  # non-member-like
    assert type(svc["mia_efficacy_attack"]).__name__ == "SVC"
    with pytest.raises(ValueError, match="unknown MIA attack 'svm'"):
        mia(out, attack="svm")


def test_salun_draws_random_labels_from_every_class_and_rl_from_the_others():
    from training.unlearning import create_method
    from training.unlearning.base import UnlearningData

    labels = torch.zeros(3000, dtype=torch.long)
    data = UnlearningData((torch.zeros(3000, 3, 2, 2, dtype=torch.uint8), labels),
                          (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)), 4)
    for name, keeps_true in (("salun", True), ("rl", False)):
        _, new = create_method(name, {"epochs": 1}, seed=0).relabelled(data)
        counts = torch.bincount(new[:3000], minlength=4).tolist()
        assert (counts[0] > 0) == keeps_true and all(c > 0 for c in counts[1:]), (name, counts)
        if keeps_true:  # uniform over the 4 classes: each count within 4 sigma of 750
            assert all(abs(c - 750) < 4 * (3000 * 0.25 * 0.75) ** 0.5 for c in counts)


def test_unlearning_claim_is_judged_over_seeds_and_chance_is_shown_as_such():
    from evaluators.downstream_report import _mean_std, _unlearning_claim

    def row(gap, std, seeds=3):
        return {"avg_gap": gap, "avg_gap_std": std, "seeds": seeds, "MIA": None, "MIA_std": None}

    three = _unlearning_claim({"random-10": {"ft": row(10.0, 1.0), "natmu": row(2.0, 1.0), "muso": row(9.5, 1.0)}})
    # Welch over 3 vs 3 seeds: t = 8 / 0.82, 4 degrees of freedom (p = 0.0006); a 0.5 gap is noise (p = 0.57)
    assert "natmu vs ft: Avg Gap 2.0 ± 1.0 vs 10.0 ± 1.0: reproduces (difference -8.0" in three
    assert "muso vs ft: Avg Gap 9.5 ± 1.0 vs 10.0 ± 1.0: cannot tell (difference -0.5" in three
    assert "p < 0.001" in three and "p = 0.57" in three
    one = _unlearning_claim({"random-10": {"ft": row(10.0, 0.0, 1), "natmu": row(2.0, 0.0, 1)}})
    assert "natmu vs ft: Avg Gap 2.0 vs 10.0: cannot tell (1 seed: no test)" in one
    assert _mean_std(row(1.0, 0.0), "MIA") == "n/a (attack at chance)"
    assert _mean_std({"RA": 99.0}, "MIA") == ""  # not measured at all
    # one number format: one decimal for percentages, three for the divergences, whatever the stored precision
    assert _mean_std({"UA": 12.3456, "UA_std": 0.04, "seeds": 3}, "UA") == "12.3 ± 0.0"
    assert _mean_std({"KL": 0.44291, "seeds": 1}, "KL") == "0.443"
