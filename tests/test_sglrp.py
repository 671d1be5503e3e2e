"""SGLRP heat maps: properties, relevance conservation, and the fast (explicit) path against the reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from attacks.sglrp import SGLRP, UnsupportedLayerError
from model_zoo.zoo import ImageClassifier, ModelSpec, build_model

TINY_RESNET = dict(channels=(8, 16, 32, 64), stem_width=8)


def _randomise_bn(model):
    """Non-trivial BatchNorm statistics, so folding them into the convs is actually exercised."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model


def _model(arch, **kwargs):
    torch.manual_seed(0)
    m = build_model(ModelSpec(name=arch, arch=arch, num_classes=10, kwargs=kwargs, data={"input_size": (3, 32, 32)}))
    return _randomise_bn(m).double().eval()


MODELS = {"vgg": lambda: _model("vgg_demo"), "resnet": lambda: _model("resnet10t", **TINY_RESNET)}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_forward_equals_model_with_batchnorm_folded(family):
    model = MODELS[family]()
    x = torch.rand(3, 3, 32, 32, dtype=torch.double)
    torch.testing.assert_close(SGLRP(model)(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg_demo", "resnet10t"])
def test_heatmaps_non_negative_nonzero_and_class_specific(trained_zoo, name):
    """On trained models (a random net puts most relevance on dead units, where LRP cannot follow it)."""
    from model_zoo.zoo import build_model as build

    spec = next(s for s in json.loads((trained_zoo["out"] / "models.json").read_text()) if s["name"] == name)
    lrp = SGLRP(build(spec))
    x = torch.rand(6, 3, 32, 32)
    logits = lrp(x)
    h = lrp.heatmaps(logits, [logits.argmax(1), torch.full((6,), 7)])
    assert h.shape == (2, 6, 32, 32)
    assert (h >= 0).all()
    assert (h[0].flatten(1).sum(1) > 0).all()
    assert ((h[0] - h[1]).abs().flatten(1).sum(1) > 1e-3 * h[0].flatten(1).sum(1)).all()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_fast_path_matches_reference_heatmaps_and_loss_gradients(family):
    lrp = SGLRP(MODELS[family]())
    x = torch.rand(3, 3, 32, 32, dtype=torch.double, requires_grad=True)
    y, y2 = torch.tensor([0, 4, 9]), torch.tensor([3, 3, 1])
    grads, maps = [], []
    for explicit in (True, False):
        h = lrp.heatmaps(lrp(x), [y, y2], explicit=explicit)
        loss = (h[0].flatten(1).sum(1).log() - h[1].flatten(1).sum(1).log()).sum()
        grads.append(torch.autograd.grad(loss, x)[0])
        maps.append(h.detach())
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    assert grads[0].abs().sum() > 0


def test_zplus_relevance_is_conserved_on_bias_free_relu_network():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 32, bias=False), nn.ReLU(), nn.Linear(32, 10, bias=False),
    )
    model = ImageClassifier(net, {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}).double().eval()
    lrp = SGLRP(model)
    x = torch.rand(5, 3, 32, 32, dtype=torch.double)
    lrp(x)
    r = torch.rand(5, 10, dtype=torch.double)
    relevance = lrp.input_relevance(r)
    torch.testing.assert_close(relevance.flatten(1).sum(1), r.sum(1), rtol=1e-6, atol=1e-9)


def test_heatmap_is_the_sglrp_formula_over_two_separate_passes():
    """h = ReLU(A_t - A_d * sum(A_t) / sum(A_d)), each map from its own relevance pass, computed naively here."""
    lrp = SGLRP(MODELS["vgg"]())
    x = torch.rand(3, 3, 32, 32, dtype=torch.double)
    logits = lrp(x)
    c = torch.tensor([2, 5, 9])
    p = logits.softmax(1)
    expected = []
    for i in range(3):
        lrp(x[i : i + 1])  # activations of image i alone
        start_t = torch.zeros(1, 10, dtype=torch.double)
        start_t[0, c[i]] = p[i, c[i]]
        start_d = p[i : i + 1].clone()
        start_d[0, c[i]] = 0
        a_t = lrp.input_relevance(start_t).sum(1)[0]
        a_d = lrp.input_relevance(start_d).sum(1)[0]
        expected.append(torch.relu(a_t - a_d * a_t.sum() / a_d.sum()))
    lrp(x)
    torch.testing.assert_close(lrp.heatmaps(logits, [c])[0], torch.stack(expected), rtol=1e-7, atol=1e-12)


def test_unsupported_layer_is_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    model = ImageClassifier(net, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    with pytest.raises(UnsupportedLayerError, match=r"layer '1' \(GELU\)"):
        SGLRP(model)
    convnext = build_model(ModelSpec(name="c", arch="convnext_atto", num_classes=10))
    with pytest.raises(UnsupportedLayerError, match="ConvNeXt"):
        SGLRP(convnext)
