"""Attacks: every registered attack keeps its budgets after uint8 rounding; AoA moves attention off the true class."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attacks import AttackConfig, create_attack, list_attacks, quantize, rmsd
from attacks.base import gaussian_kernel, unit_mean_abs
from attacks.sglrp import UnsupportedLayerError
from model_zoo.zoo import ModelSpec, build_model
from pipelines.stages import read_models_file

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

    spec = next(s for s in read_models_file(trained_zoo["out"] / "models.json") if s.name == "vgg_demo")
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


@pytest.mark.parametrize("name,options", [("aoa", {"si": 4, "si_x_twice": True}), ("di-fgsm", {"di": 1.0, "si": 2}),
                                          ("bsr", {}), ("admix", {})])
def test_sub_batches_give_the_whole_batch_gradient(name, options, random_surrogate):
    """Memory is bounded by running the SI copies a few images at a time; DI is drawn once for all of them, BSR's
    layouts once per copy (a pass of 2 rows of 3-image copies straddles two copies).
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
    from pipelines.flows.generate import threads_per_cpu_worker

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert threads_per_cpu_worker(["cpu"] * 4, units=10) == 4
    assert threads_per_cpu_worker(["cpu"] * 4, units=1) == 16  # one shard: one worker runs, with every core
    assert threads_per_cpu_worker(["cpu"] * 4, units=3) == 5
    assert threads_per_cpu_worker(["cuda:0", "cuda:1"], units=5) == 16  # GPU workers do not take CPU threads


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


def _with_objective(name, objective):
    """The registered attack ``name`` with its cross-entropy replaced by ``objective`` (per-image values)."""
    from attacks.registry import attack_builder

    cls = type(f"Closed{name}", (attack_builder(name).cls,), {"objective": lambda self, x, y: objective(x)})
    model = build_model(ModelSpec(name="m", arch="vgg_demo", num_classes=10))  # present, not used by the objective
    return cls(model, AttackConfig(eta=7 / 255, eps=0.1, alpha=2 / 255), **attack_builder(name).preset)


def test_vmi_variance_is_the_mean_neighbour_gradient_minus_the_gradient_and_is_used_one_step_late():
    """J = sum x^3 / 3, so grad J = x^2 and, for r uniform in [-a, a], E[grad J(x + r)] - grad J(x) = 2 x E[r] +
    E[r^2] = a^2 / 3 in every coordinate (a = beta * eps, the paper's neighbourhood); at x = 0 the sampled mean has
    no 2 x mean(r) term, so 4,000 neighbours pin it to about 1.4% per coordinate."""
    attack = _with_objective("vmi-fgsm", lambda x: x.pow(3).flatten(1).sum(1) / 3)
    attack.neighbours = 4000
    gen = torch.Generator().manual_seed(0)
    somewhere = torch.rand(2, 3, 4, 4)
    assert torch.allclose(attack.gradient(somewhere, torch.zeros(2, dtype=torch.long), gen), somewhere.pow(2))
    x, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    attack.begin(x)
    g1 = attack.gradient(x, y, gen)
    assert torch.equal(attack.tuned(g1, x, y, torch.arange(2), gen), g1)  # v_1 = 0: the first step is MI-FGSM's
    a = attack.beta * attack.config.eps
    assert attack.variance.mean().item() == pytest.approx(a**2 / 3, rel=0.01)
    assert torch.allclose(attack.variance, torch.full_like(x, a**2 / 3), atol=a**2 / 3 * 0.1)
    g2 = torch.randn_like(x)
    assert torch.allclose(attack.tuned(g2, x, y, torch.arange(2), gen) - g2, torch.full_like(x, a**2 / 3),
                          atol=a**2 / 3 * 0.1)  # the second step adds the variance measured at the first


def test_admix_gradient_averages_scaled_admixed_copies():
    """J = sum x^2 / 2, so grad_x J(g (x + eta x')) = g^2 (x + eta x'); a partner permutation moves images around
    the batch but keeps their sum, so the batch's summed gradient is mean_i 4^-i (1 + eta) sum(x), partners aside."""
    attack = _with_objective("admix", lambda x: x.pow(2).flatten(1).sum(1) / 2)
    x, y = torch.rand(5, 3, 4, 4), torch.zeros(5, dtype=torch.long)
    g = attack.gradient(x, y, torch.Generator().manual_seed(0))
    m1, eta = attack.config.si, attack.strength
    scale = sum(4.0**-i for i in range(m1)) / m1
    assert (m1, attack.partners, eta, attack.config.mi) == (5, 3, 0.2, 1.0)  # the paper's settings
    assert torch.allclose(g.sum(0), scale * (1 + eta) * x.sum(0), atol=1e-5)
    one = attack.gradient(x[:1], y[:1], torch.Generator().manual_seed(0))  # alone: mixed with itself
    assert torch.allclose(one, scale * (1 + eta) * x[:1], atol=1e-6)
    assert attack.copies_per_image == 15


def test_bsr_copies_are_shuffled_blocks_and_their_gradient_sees_every_pixel_once():
    """Without rotation each copy is the image cut into blocks and put back in another order: along every output
    row (column) the source column (row) advances by one except where a block ends, and an objective that ignores
    where pixels are has the plain gradient, mean over 20 copies included."""
    from attacks.bsr import random_lengths

    h, w = 12, 15
    coords = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)  # each pixel holds its own position
    attack = _with_objective("bsr", lambda x: x.pow(2).flatten(1).sum(1) / 2)
    attack.max_angle = 0.0
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        copy = attack.apply_layout(coords, attack.draw_layout(h, w, gen))[0, 0].long()
        assert sorted(copy.flatten().tolist()) == list(range(h * w))  # a permutation of the pixels
        rows, cols = copy // w, copy % w
        row_breaks = (cols[:, 1:] - cols[:, :-1] != 1).sum(1)  # per output row: where the source jumps
        col_breaks = (rows[1:, :] - rows[:-1, :] != 1).sum(0)
        assert row_breaks.max() <= attack.blocks - 1 and col_breaks.max() <= attack.blocks - 1
    x, y = torch.rand(2, 3, h, w), torch.zeros(2, dtype=torch.long)
    assert torch.allclose(attack.gradient(x, y, gen), x, atol=1e-6)
    assert sum(random_lengths(224, 3, gen)) == 224 and min(random_lengths(5, 3, gen)) >= 1
    turned = _with_objective("bsr", lambda x: x.pow(2).flatten(1).sum(1) / 2)  # 24 degrees: pixels interpolated
    assert (turned.max_angle, turned.copies, turned.blocks) == (24.0, 20, 3)
    layout = turned.draw_layout(h, w, gen)
    assert all(0 < abs(a) <= 24 for row in layout["angles"] for a in row)
    assert not torch.equal(turned.apply_layout(coords, layout).flatten().sort()[0], coords.flatten())  # interpolated
