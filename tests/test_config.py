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
    p = load_params(overrides=dict([parse_override("train.epochs=2"),
                                    parse_override("train.models.cnn.arch=tiny_cnn")]))
    assert p.train.epochs == 2 and p.train.models["cnn"].arch == "tiny_cnn"


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ParamsError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_are_frozen():
    from dataclasses import FrozenInstanceError

    p = params_from_dict({})
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'epochs'"):
        p.train.epochs = 5  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'lr'"):
        p.train.models["cnn"].lr = 0.5  # type: ignore[misc]
    assert p.train.epochs == params_from_dict({}).train.epochs


# --------------------------------------------------------------------------- issue 14: every key declared

@pytest.mark.parametrize("override,match", [
    # the values issue 14 found accepted
    ({"drift.threshold_share": 5}, r"drift\.threshold_share must be in \(0, 1\], got 5"),
    ({"robustness.severities": [7, 0]}, r"robustness\.severities\[0\] must be in \[1, 5\], got 7"),
    ({"export.int8.max_accuracy_drop": -1}, r"export\.int8\.max_accuracy_drop must be in \[0, 1\], got -1"),
    ({"export.opset": 3}, r"export\.opset must be in \[17, 23\], got 3"),
    ({"train.patience": -4}, r"train\.patience must be >= 1, got -4"),
    ({"train.models.cnn.lr": -1}, r"train\.models\.cnn\.lr must be in \(0, 1\], got -1"),
    ({"train.models.cnn.arch": "resnet9000"},
     r"train\.models\.cnn\.arch must be one of .*efficientnet_lite0.* \(the model registry\), got 'resnet9000'"),
    # more of the declaration
    ({"robustness.severities": []}, r"robustness\.severities must have at least 1 item"),
    ({"data.split": [0.7, 0.3]}, r"data\.split must be a list of 3 items"),
    ({"train.label_smoothing": 1.0}, r"train\.label_smoothing must be in \[0, 1\)"),
    ({"train.distributed.backend": "mpi"}, r"train\.distributed\.backend must be one of auto, gloo, nccl"),
    ({"train.models": {}}, r"train\.models must have at least 1 item"),
    ({"train.models": {"a b": {"arch": "tiny_cnn"}}}, r"train\.models keys must match"),
    ({"resources.train.cpu": 0}, r"resources\.train\.cpu must be >= 1, got 0"),
    ({"registry.alias": "latest"}, r"registry\.alias must match"),
    ({"calibration.target_precision": float("nan")}, r"calibration\.target_precision must be a finite number"),
    ({"train.epochs": None}, r"train\.epochs must not be null"),
    ({"data.max_images_per_class": 0}, r"data\.max_images_per_class must be >= 1, got 0"),
])
def test_every_rule_names_the_key(override, match):
    with pytest.raises(ParamsError, match=match):
        load_params(overrides=override)


def test_bad_value_in_a_file_is_rejected_at_load(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  models:\n    cnn: {arch: resnet9000, lr: 0.001}\n")
    with pytest.raises(ParamsError, match=r"train\.models\.cnn\.arch must be one of"):
        load_params(f)


def test_every_field_is_declared_with_a_description():
    """No parameter without a description and a rule entry (the schema is only as good as this)."""
    import dataclasses

    from plantml.config import Params, rule_of

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            assert rule_of(f).doc, f"{key} has no description"
            hint = typing.get_type_hints(cls)[f.name]
            inner = typing.get_args(hint)[1] if typing.get_origin(hint) is dict else hint
            if dataclasses.is_dataclass(inner):
                yield from walk(inner, f"{key}.")
            yield key

    import typing

    keys = list(walk(Params, ""))
    assert "train.models" in keys and "export.int8.max_accuracy_drop" in keys and "arch" in " ".join(keys)


def test_arch_check_does_not_import_torch():
    """Checking names against the model registry keeps plantml.config torch-free."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    code = ("import sys; from plantml.config import load_params; load_params();"
            "sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_checked_in_schema_is_generated_and_params_yaml_validates():
    """params.schema.json == the schema generated from plantml.config (`make schema` refreshes it)."""
    import json

    import jsonschema
    import yaml

    from plantml.config import DEFAULT_PARAMS_PATH, SCHEMA_PATH, params_json_schema, schema_text

    assert SCHEMA_PATH.read_text() == schema_text(), "params.schema.json is stale: run `make schema`"
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(params_json_schema())
    assert not list(validator.iter_errors(yaml.safe_load(DEFAULT_PARAMS_PATH.read_text())))
    # the schema rejects what the loader rejects
    bad = yaml.safe_load(DEFAULT_PARAMS_PATH.read_text())
    bad["drift"]["threshold_share"] = 5
    bad["train"]["models"]["cnn"]["arch"] = "resnet9000"
    bad["train"]["epocs"] = 3
    paths = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(bad)}
    assert {"drift/threshold_share", "train/models/cnn/arch", "train"} <= paths


# --------------------------------------------------------------------------- issue 16: the edge student

def test_student_section_is_declared():
    s = load_params().student
    assert s.enabled and s.image_size < load_params().train.image_size and 0 <= s.alpha <= 1
    assert load_params().resources.distill.cpu >= 1


@pytest.mark.parametrize("override,match", [
    ({"student.alpha": 2}, r"student\.alpha must be in \[0, 1\], got 2"),
    ({"student.image_size": 100}, r"student\.image_size must be a multiple of 16"),
    ({"student.arch": "resnet9000"}, r"student\.arch must be one of"),
    ({"student.temperature": 0}, r"student\.temperature must be in \(0, 100\]"),
    ({"student.epocs": 1}, r"unknown parameter student\.epocs"),
])
def test_bad_student_values_name_the_key(override, match):
    with pytest.raises(ParamsError, match=match):
        load_params(overrides=override)
