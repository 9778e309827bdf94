import pytest

from plantml.config import ParamsError, load_params, params_from_dict, parse_override


def test_repository_params_load():
    p = load_params()
    assert {"cnn", "vit"} <= set(p.train.models)
    assert abs(sum(p.data.split) - 1) < 1e-9
    assert p.to_dict()["train"]["models"]["cnn"]["arch"] == p.train.models["cnn"].arch


def test_unknown_key_names_the_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ParamsError, match=r"unknown parameter train\.epocs"):
        load_params(f)


@pytest.mark.parametrize("override,match", [
    ({"train.epochs": "three"}, r"train\.epochs must be an integer"),
    ({"train.image_size": 100}, r"train\.image_size must be a multiple of 16"),
    ({"data.split": [0.5, 0.5, 0.5]}, r"data\.split"),
    ({"train.device": "tpu"}, r"train\.device"),
    ({"export.int8.enabled": "yes"}, r"export\.int8\.enabled must be true or false"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ParamsError, match=match):
        load_params(overrides=override)


def test_overrides_and_nested_models():
    p = load_params(overrides=dict([parse_override("train.epochs=2"), parse_override("train.models.cnn.arch=tiny_cnn")]))
    assert p.train.epochs == 2 and p.train.models["cnn"].arch == "tiny_cnn"


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ParamsError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_are_frozen():
    p = params_from_dict({})
    with pytest.raises(Exception):
        p.train.epochs = 5  # type: ignore[misc]
