"""OOD metrics against scikit-learn and brute force (ties included), OrthLoss's terms at their extremes, the
feature hook against the classifier head, and the stage end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluators.ood import POSITIVE, auroc, average_precision, fpr_at_tpr, ood_metrics
from training.ood import create_method
from training.ood.orthloss import orth_loss, par_loss
from training.ood.scores import orthloss


def brute_force_fpr95(id_scores, ood_scores):
    best = 1.0
    for t in np.unique(np.concatenate([id_scores, ood_scores])):
        if np.mean(id_scores >= t) >= 0.95:
            best = min(best, float(np.mean(ood_scores >= t)))
    return best


SCORE_SETS = {
    "random": (np.random.default_rng(0).normal(1, 1, 300), np.random.default_rng(1).normal(0, 1, 200)),
    "heavy ties": (np.random.default_rng(2).integers(0, 5, 101).astype(float),
                   np.random.default_rng(3).integers(0, 4, 57).astype(float)),
    "hand-made": (np.array([0.9, 0.8, 0.8, 0.7, 0.5, 0.5, 0.3, 0.2, 0.2, 0.1] * 2),
                  np.array([0.8, 0.5, 0.5, 0.4, 0.2, 0.0])),
    "separable": (np.linspace(1, 2, 40), np.linspace(-1, 0.5, 20)),
}


@pytest.mark.parametrize("name", SCORE_SETS)
def test_metrics_agree_with_sklearn_and_brute_force(name):
    ids, oods = SCORE_SETS[name]
    y = np.concatenate([np.ones(len(ids)), np.zeros(len(oods))])
    s = np.concatenate([ids, oods])
    assert auroc(ids, oods) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(ids, oods) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert average_precision(-oods, -ids) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert fpr_at_tpr(ids, oods) == brute_force_fpr95(ids, oods)


def test_hand_computed_values_and_stated_positive_class():
    ids, oods = np.array([3.0, 2.0, 1.0]), np.array([2.0, 0.0])
    # pairs (id > ood): 3>2, 3>0, 2>0, 1>0; one tie (2, 2) counts one half: 4.5 / 6
    assert auroc(ids, oods) == pytest.approx(4.5 / 6)
    # 95% of 3 ID samples needs all three: threshold 1.0, and one OOD score of two is >= 1.0
    assert fpr_at_tpr(ids, oods) == 0.5
    m = ood_metrics(ids, oods)
    assert m["auroc"] == 75.0 and m["fpr95"] == 50.0
    assert POSITIVE == "in-distribution"
    with pytest.raises(ValueError, match="0 OOD"):
        ood_metrics(ids, [])


def test_orth_loss_is_zero_when_orthogonal_and_maximal_when_aligned():
    w = torch.eye(4)[:3] * 2.5  # three class weights along the first three axes
    orthogonal = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    assert orth_loss(orthogonal, w).item() == pytest.approx(0.0)
    aligned = torch.tensor([[0.0, 7.0, 0.0, 0.0]])
    assert orth_loss(aligned, w).item() == pytest.approx(1.0)
    # the maximum of sum_k |cos| over unit features is sqrt(K) for orthogonal weights, at the diagonal direction
    assert orth_loss(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), w).item() == pytest.approx(3**0.5)
    assert par_loss(aligned, torch.tensor([1]), w).item() == pytest.approx(-1.0)
    assert par_loss(orthogonal, torch.tensor([1]), w).item() == pytest.approx(0.0)
    # the OrthLoss score rewards alignment: an aligned ID-like feature outscores an orthogonal one
    logits = torch.zeros(2, 3)
    assert (orthloss(logits, torch.cat([aligned, orthogonal]), w) == torch.tensor([1 / 3 + 1.0, 1 / 3])).all()


def test_orth_and_par_terms_do_not_train_the_class_weights():
    w = torch.randn(3, 5, requires_grad=True)
    f = torch.randn(4, 5, requires_grad=True)
    (orth_loss(f, w) + par_loss(f, torch.tensor([0, 1, 2, 0]), w)).backward()
    assert w.grad is None and f.grad is not None


def _tiny_classifier(num_classes=4):
    from model_zoo.spec import ModelSpec
    from model_zoo.zoo import build_model

    torch.manual_seed(0)
    return build_model(ModelSpec(name="t", arch="test_resnet", num_classes=num_classes,
                                 data={"input_size": [3, 32, 32], "crop_pct": 1.0}))


def test_feature_hook_returns_what_the_head_consumes():
    from training.ood.features import class_weights, features_and_logits

    model = _tiny_classifier()
    x = torch.rand(3, 3, 32, 32)
    feats, logits = features_and_logits(model, x)
    head = model.model.get_classifier()
    torch.testing.assert_close(logits, model(x))  # same logits as the plain forward
    torch.testing.assert_close(feats @ class_weights(model).T + head.bias, logits)
    assert feats.shape == (3, head.in_features)


def test_orthloss_switches_its_terms_on_halfway():
    model = _tiny_classifier()
    x_id, y_id, x_out = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.rand(4, 3, 32, 32)
    orth, oe = create_method("orthloss"), create_method("oe")
    model.eval()
    torch.testing.assert_close(orth.loss(model, x_id, y_id, x_out), oe.loss(model, x_id, y_id, x_out))
    orth.progress = 0.5
    assert not torch.allclose(orth.loss(model, x_id, y_id, x_out), oe.loss(model, x_id, y_id, x_out))
    with pytest.raises(ValueError, match="unknown OOD fine-tuning method"):
        create_method("odin")


@pytest.fixture(scope="module")
def outlier_folders(tmp_path_factory):
    from sources.demo_world import generate_demo_world

    root = tmp_path_factory.mktemp("outliers")
    generate_demo_world(root, counts={}, outliers=40)
    return root / "outliers"


@pytest.mark.slow
def test_ood_stage_on_the_small_world(small_world, outlier_folders, prefect_server, tmp_path):
    from model_zoo.spec import ModelSpec
    from model_zoo.zoo import build_model
    from pipelines.config import Ood
    from pipelines.flows.ood import evaluate_detector, load_ood_data, ood_flow
    from pipelines.stages import DownstreamPaths

    cfg = Ood(**{"model": "tiny", "train_root": str(small_world / "train"), "val_root": str(small_world / "val"),
           "id_classes": [0, 1, 2, 5, 6, 7], "pretrain": {"epochs": 3, "lr": 0.005},
           "aux_outliers": {"classes": [3, 8], "folders": [str(outlier_folders / "smooth_noise")]},
           "test_ood": {"held-out-classes": {"classes": [4, 9]}, "blobs": {"folder": str(outlier_folders / "blobs")}},
           "recipe": {"epochs": 1, "lr": 0.001, "warmup_epochs": 0},
           "methods": {"oe": {"method": "oe"}, "orthloss": {"method": "orthloss"},
                       "energy-oe": {"method": "energy-oe", "search": {"m_in": [-2.0, 0.0], "m_out": [2.0]}}},
           "seed": 0, "seeds": [0, 1]})
    spec = ModelSpec(name="tiny", arch="test_resnet", num_classes=10, data={"input_size": [3, 32, 32], "crop_pct": 1.0})
    metrics = ood_flow(cfg, spec, DownstreamPaths(tmp_path / "ood", tmp_path / "ood.json", tmp_path / "reports",
                                                  tmp_path / "plots"))
    assert metrics["positive"] == "in-distribution"
    assert list(metrics["methods"]) == ["baseline", "oe", "orthloss", "energy-oe"]
    assert [m["score"] for m in metrics["methods"].values()] == ["msp", "msp", "orthloss", "energy"]
    assert [m["seeds"] for m in metrics["methods"].values()] == [1, 2, 2, 2]
    import statistics

    oe = metrics["methods"]["oe"]
    fprs = [run["blobs"]["fpr95"] for run in oe["per_seed"]]
    assert oe["sets"]["blobs"]["fpr95"] == {"mean": round(statistics.mean(fprs), 2),
                                           "std": round(statistics.stdev(fprs), 2)}
    search = metrics["margin_search"]["energy-oe"]
    best = min(search["candidates"], key=lambda c: (c["fpr95"], -c["auroc"]))
    assert (search["m_in"], search["m_out"]) == (best["m_in"], best["m_out"])
    options = metrics["methods"]["energy-oe"]["options"]
    assert (options["m_in"], options["m_out"]) == (best["m_in"], best["m_out"])  # the runs used the chosen margins
    assert [c["m_in"] - search["median_id_energy"] for c in search["candidates"]] == pytest.approx([-2.0, 0.0])
    data = load_ood_data(cfg, 32)
    assert len(data["id_test"][0]) == 120 and set(data["id_test"][1].tolist()) == set(range(6))  # relabelled
    assert len(data["outliers"]) == 120 + 40 and len(data["tests"]["blobs"]) == 40
    # the saved checkpoint reproduces the reported numbers
    model = build_model(spec.replace(num_classes=6, weights=str(tmp_path / "ood" / "orthloss.safetensors")))
    again = evaluate_detector(model, data)
    assert again["sets"]["blobs"]["orthloss"] == metrics["methods"]["orthloss"]["per_seed"][0]["blobs"]  # seed 0
    assert again["id_acc"] > 100 / 6
    page = (tmp_path / "reports" / "ood" / "index.md").read_text()
    assert "in-distribution" in page and "| orthloss | orthloss | 2 |" in page and "m_in" in page
    assert (tmp_path / "reports" / "ood" / "roc.png").is_file()
