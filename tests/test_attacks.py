"""Attacks: every registered attack keeps its budgets after uint8 rounding; AoA moves attention off the true class."""

from __future__ import annotations

import json

import pytest
import torch

from attacks import AttackConfig, create_attack, list_attacks, quantize, rmsd
from attacks.base import gaussian_kernel
from attacks.sglrp import UnsupportedLayerError
from model_zoo.zoo import ModelSpec, build_model

BUDGET = AttackConfig(eta=4 / 255, eps=12 / 255, alpha=2 / 255, max_steps=30)


@pytest.fixture(scope="module")
def random_surrogate():
    torch.manual_seed(0)
    return build_model(ModelSpec(name="v", arch="vgg_demo", num_classes=10))


def test_registry_has_aoa_and_every_baseline():
    assert set(list_attacks()) >= {"aoa", "pgd", "mi-fgsm", "di-fgsm", "ti-fgsm", "si-fgsm"}
    with pytest.raises(KeyError, match="unknown attack 'cw'.*aoa"):
        create_attack("cw", None)


@pytest.mark.parametrize("name", list_attacks())
def test_outputs_respect_range_grid_linf_and_rmsd_budget(name, random_surrogate):
    torch.manual_seed(1)
    x = quantize(torch.rand(6, 3, 32, 32))
    x[0] = 0.0  # a black image: clipping at 0 must not break the budget
    y = torch.randint(0, 10, (6,))
    adv, records = create_attack(name, random_surrogate, BUDGET)(x, y)
    assert adv.min() >= 0 and adv.max() <= 1
    torch.testing.assert_close(adv, quantize(adv), rtol=0, atol=0)  # on the uint8 grid
    assert ((adv - x).abs().flatten(1).amax(1) <= BUDGET.eps + 1e-7).all()
    dist = rmsd(adv, x)
    assert (dist <= BUDGET.eta * 255 + 1e-6).all()
    assert dist.mean() > 0.9 * BUDGET.eta * 255  # the budget is used, not left on the table
    assert [r["rmsd"] for r in records] == pytest.approx(dist.tolist(), abs=1e-3)
    assert all(r["steps"] >= 1 and r["attack"] == name for r in records)


def test_records_have_the_same_fields_for_every_attack(random_surrogate):
    x, y = quantize(torch.rand(2, 3, 32, 32)), torch.tensor([1, 2])
    fields = {name: set(create_attack(name, random_surrogate, BUDGET)(x, y)[1][0]) for name in list_attacks()}
    first = fields["aoa"]
    assert all(f == first for f in fields.values())
    assert {"pred_before", "pred_after", "p_true_before", "p_true_after", "attention_ratio_before",
            "attention_ratio_after", "steps", "rmsd", "linf", "config_hash"} <= first


def test_same_seed_same_images_different_seed_differs(random_surrogate):
    x, y = quantize(torch.rand(3, 3, 32, 32)), torch.tensor([0, 1, 2])
    attack = create_attack("di-fgsm", random_surrogate, BUDGET, di=1.0)
    a, _ = attack(x, y, seed=5)
    b, _ = attack(x, y, seed=5)
    c, _ = attack(x, y, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ti_kernel_is_a_normalised_symmetric_gaussian():
    k = gaussian_kernel(15)
    assert k.shape == (15, 15) and k.sum().item() == pytest.approx(1.0)
    assert torch.equal(k, k.T) and torch.equal(k, k.flip(0)) and k.argmax().item() == 7 * 15 + 7


def test_aoa_refuses_a_surrogate_without_lrp_rules():
    convnext = build_model(ModelSpec(name="c", arch="convnext_atto", num_classes=10))
    with pytest.raises(UnsupportedLayerError):
        create_attack("aoa", convnext)


def test_aoa_fast_and_reference_paths_give_the_same_images(random_surrogate):
    model = random_surrogate.double()
    try:
        x, y = quantize(torch.rand(2, 3, 32, 32, dtype=torch.double)), torch.tensor([3, 4])
        cfg = AttackConfig(eta=3 / 255, eps=12 / 255, alpha=1 / 255, max_steps=3, si=2)
        fast, _ = create_attack("aoa", model, cfg)(x, y)
        ref, _ = create_attack("aoa", model, cfg, explicit=False)(x, y)
        torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    finally:
        random_surrogate.float()


@pytest.mark.slow
def test_aoa_lowers_attention_ratio_on_demo_surrogate(trained_zoo, small_world):
    from sources.reading import Rejects, class_folder_source, load_images

    spec = next(s for s in json.loads((trained_zoo["out"] / "models.json").read_text()) if s["name"] == "vgg_demo")
    surrogate = build_model(spec)
    rejects = Rejects()
    samples, _ = class_folder_source(small_world / "val", rejects)
    x, y, _ = load_images(samples[::10], 32, rejects)
    adv, records = create_attack("aoa", surrogate, AttackConfig(eta=7 / 255, eps=25.5 / 255, alpha=2 / 255, si=4))(
        x.float() / 255, y
    )
    lowered = [r["attention_ratio_after"] < r["attention_ratio_before"] for r in records]
    assert sum(lowered) >= 0.8 * len(records)
    clean_acc = sum(r["pred_before"] == t for r, t in zip(records, y.tolist())) / len(records)
    adv_acc = sum(r["pred_after"] == t for r, t in zip(records, y.tolist())) / len(records)
    assert adv_acc < clean_acc
