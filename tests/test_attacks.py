"""Attacks: every registered attack keeps its budgets after uint8 rounding; AoA moves attention off the true class."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from attacks import AttackConfig, create_attack, list_attacks, quantize, rmsd
from attacks.base import gaussian_kernel, unit_mean_abs
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


def _copy_gradient(attack, x, y):
    """The objective's gradient at one (already scaled) copy, computed on its own."""
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(attack.objective(x, y).sum(), x)
    return g


def test_aoa_si_step_is_the_mean_of_five_normalised_copy_directions(random_surrogate):
    """The authors' SI: x, x, x/2, x/4, x/8, each gradient L1-normalised (N / ||g||_1), averaged, not re-normalised."""
    model = random_surrogate.double()
    try:
        x, y = quantize(torch.rand(2, 3, 32, 32, dtype=torch.double)), torch.tensor([3, 4])
        attack = create_attack("aoa", model, AttackConfig(si=4, si_x_twice=True))
        copies = [x, x, x / 2, x / 4, x / 8]
        naive = sum(g * g[0].numel() / g.flatten(1).abs().sum(1).view(-1, 1, 1, 1)
                    for g in (_copy_gradient(attack, c, y) for c in copies)) / 5
        got = attack.gradient(x, y, torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, naive.float(), rtol=1e-5, atol=1e-6)
        assert torch.equal(attack._direction(got), got)  # the step is alpha times this mean
        assert (got.abs().flatten(1).mean(1) < 1).all()  # shorter than alpha, as in the authors' code
    finally:
        random_surrogate.float()


def test_si_fgsm_step_is_the_sign_of_the_summed_raw_copy_gradients(random_surrogate):
    """Lin et al.: the copies' raw gradients are summed (a copy with a large gradient weighs more), then signed."""
    model = random_surrogate.double()
    try:
        x, y = quantize(torch.rand(2, 3, 32, 32, dtype=torch.double)), torch.tensor([3, 4])
        attack = create_attack("si-fgsm", model, AttackConfig(si=4))
        raw = sum(_copy_gradient(attack, x / 2**i, y) for i in range(4))
        got = attack.gradient(x, y, torch.Generator().manual_seed(0))
        torch.testing.assert_close(attack._direction(got), raw.sign().float(), rtol=0, atol=0)
        normalised = sum(unit_mean_abs(_copy_gradient(attack, x / 2**i, y)) for i in range(4))
        assert not torch.equal(normalised.sign().float(), attack._direction(got))  # the rule makes a difference
    finally:
        random_surrogate.float()


def test_di_transforms_with_exactly_the_configured_probability(random_surrogate):
    x = torch.rand(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    for p in (0.3, 1.0):
        attack = create_attack("di-fgsm", random_surrogate, BUDGET, di=p)
        changed = sum(not torch.equal(attack._diverse(*x.shape[-2:], gen)(x), x) for _ in range(1000))
        sigma = (1000 * p * (1 - p)) ** 0.5
        assert abs(changed - 1000 * p) <= 3 * sigma + 1e-9  # at p = 1 every draw transforms


def test_precision_policy_fp32_is_faithful_and_bf16_is_not(random_surrogate):
    """The default policy keeps AoA's heat map within 1% of fp64 and the gradient at cosine >= 0.999 (CPU autocast
    stands in for the GPU's bf16); bf16 autocast does not, which is why it is not AoA's policy."""
    from attacks.aoa import policy_error

    torch.manual_seed(2)
    x, y = quantize(torch.rand(4, 3, 32, 32)), torch.tensor([0, 3, 5, 7])
    assert AttackConfig().precision == "fp32" and create_attack("aoa", random_surrogate).config.precision == "fp32"
    faithful = policy_error(random_surrogate, x, y, "fp32")
    assert faithful["map_rel_error"] < 0.01 and faithful["grad_cosine"] >= 0.999
    coarse = policy_error(random_surrogate, x, y, "bf16")
    assert coarse["map_rel_error"] > 0.01 or coarse["grad_cosine"] < 0.999
    with pytest.raises(ValueError, match="precision must be one of"):
        AttackConfig(precision="bf17")


def test_aoa_conventions_reach_sglrp_and_the_config_hash(random_surrogate):
    authors = create_attack("aoa", random_surrogate)
    literal = create_attack("aoa", random_surrogate, bounds="channel", relu="sum")
    assert (authors.sglrp.relu, authors.sglrp.steps[0].bounds) == ("channel", "image")
    assert (literal.sglrp.relu, literal.sglrp.steps[0].bounds) == ("sum", "channel")
    assert authors.config_hash != literal.config_hash
    x, y = quantize(torch.rand(2, 3, 32, 32)), torch.tensor([1, 2])
    assert not torch.equal(authors.gradient(x, y, torch.Generator()), literal.gradient(x, y, torch.Generator()))


@pytest.mark.parametrize("name,options", [("aoa", {"si": 4, "si_x_twice": True}), ("di-fgsm", {"di": 1.0, "si": 2})])
def test_sub_batches_give_the_whole_batch_gradient(name, options, random_surrogate):
    """Memory is bounded by running the SI copies a few images at a time; DI is drawn once for all of them.
    The input is seeded, not drawn from the suite's global generator: a random net's logits can be near-tied, and
    rounding noise then flips AoA's runner-up class (another objective, not another computation). AoA's gradient is a
    small difference of large relevance maps: another batch shape sums in another order, which moves it by up to
    ~1e-4 of its largest element (AVX2 kernels; 3e-7 with AVX-512); a wrong split is off by order one."""
    x, y = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3])
    whole = create_attack(name, random_surrogate, BUDGET, **options)
    split = create_attack(name, random_surrogate, replace(BUDGET, sub_batch=2), **options)
    g_whole = whole.gradient(x, y, torch.Generator().manual_seed(5))
    g_split = split.gradient(x, y, torch.Generator().manual_seed(5))
    torch.testing.assert_close(g_split, g_whole, rtol=1e-3, atol=1e-3 * g_whole.abs().max().item())


def test_cpu_workers_share_the_cores_only_with_workers_that_can_run(monkeypatch):
    from pipelines.flows.generate import cpu_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert cpu_threads(["cpu"] * 4, units=10) == 4
    assert cpu_threads(["cpu"] * 4, units=1) == 16  # one shard: one worker runs, with every core
    assert cpu_threads(["cpu"] * 4, units=3) == 5
    assert cpu_threads(["cuda:0", "cuda:1"], units=5) == 16  # GPU workers do not take CPU threads


def test_the_registry_names_each_method_where_its_module_registers_it():
    """list_attacks() answers without importing any method; each name's module registers exactly that name."""
    import importlib

    from attacks import registry

    for name, module in registry.METHOD_MODULES.items():
        importlib.import_module(module)
        assert name in registry._ATTACKS, (name, module)
    assert sorted(registry._ATTACKS) == list_attacks()


def test_auto_precision_is_fp32_on_a_cpu_and_the_records_say_so():
    """bf16 only where the device computes it natively: these CPUs emulate it (a VGG19 PGD step about 5x slower)."""
    from attacks.precision import resolve_precision
    from model_zoo.zoo import ModelSpec, build_model

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # asked for by name: as given
    model = build_model(ModelSpec(name="v", arch="vgg_demo", num_classes=10, data={"input_size": (3, 32, 32)}))
    attack = create_attack("pgd", model, AttackConfig(precision="auto", max_steps=1))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, records = attack(x, torch.tensor([0, 1]))
    assert attack.config.precision == "fp32" and {r["precision"] for r in records} == {"fp32"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_precision_is_bf16_on_a_gpu_that_computes_it():
    from attacks.precision import resolve_precision

    assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32")
