import numpy as np
import pytest

from plantml.config import load_params
from plantml.evaluation import QualityGateError, check_quality_gates, choose_champion, classification_metrics
from plantml.models import UnknownModelError, available_models, create_model


def test_models_by_name_build_and_run():
    torch = pytest.importorskip("torch")
    assert {"efficientnet_lite0", "hybrid_vit_tiny", "tiny_cnn"} <= set(available_models())
    for name in ("efficientnet_lite0", "hybrid_vit_tiny"):
        model = create_model(name, num_classes=4, image_size=64).eval()
        with torch.inference_mode():
            assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(UnknownModelError, match="unknown model 'resnet9000'"):
        create_model("resnet9000", 2)


def test_pretrained_lite0_weights_are_imagenet():
    """The offline weights load strictly and classify a plain image into ImageNet's 1000 classes sensibly."""
    pytest.importorskip("torch")
    from plantml.models.cnn import build_efficientnet_lite0, efficientnet_lite0_imagenet_state

    state = efficientnet_lite0_imagenet_state()
    assert state is not None and len(state) > 200
    model = build_efficientnet_lite0(pretrained=True)
    head = model.get_classifier().weight
    assert head.shape == (1000, 1280) and float(head.abs().mean()) > 0.01


def test_training_learns_and_keeps_best_epoch(tiny_shards, tmp_path):
    pytest.importorskip("torch")
    from plantml.training import load_checkpoint, train_model, validate

    params = load_params(overrides={"train.epochs": 4, "train.image_size": 32, "train.batch_size": 8,
                                    "train.models.cnn.arch": "tiny_cnn", "train.models.cnn.lr": 0.03})
    _, summary, index = tiny_shards
    result = train_model("cnn", params.train.models["cnn"], params.train, index, tmp_path, threads=1, progress=False)
    assert len(result.history) >= 1 and result.best_epoch >= 1
    assert result.best_val_accuracy >= 0.75  # solid colours are easy
    model, meta = load_checkpoint(result.checkpoint_path)
    assert meta["classes"] == summary.classes
    logits, labels = validate(model, index, result.input_spec, "cpu", 16)
    assert len(labels) == index.count("val")
    assert float((logits.argmax(1) == labels).mean()) == pytest.approx(result.best_val_accuracy)
    again = train_model("cnn", params.train.models["cnn"], params.train, index, tmp_path / "2", threads=1,
                        progress=False)
    assert [h["val_loss"] for h in again.history] == pytest.approx([h["val_loss"] for h in result.history])


def test_training_refuses_shards_of_another_size(tiny_shards, tmp_path):
    pytest.importorskip("torch")
    from plantml.training import train_model

    params = load_params(overrides={"train.image_size": 64, "train.models.cnn.arch": "tiny_cnn"})
    with pytest.raises(ValueError, match="the shards hold 32 px images but train.image_size is 64"):
        train_model("cnn", params.train.models["cnn"], params.train, tiny_shards[2], tmp_path, progress=False)


def test_thread_split_between_branches():
    from plantml.resources import available_cores, resolve_threads

    assert resolve_threads(3, 2) == 3
    assert resolve_threads(0, 2) == max(1, available_cores() // 2)


def test_metrics_on_known_predictions():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.9 + 0.1 / 3
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"][1]["recall"] == 1.0 and m["per_class"][1]["precision"] == pytest.approx(2 / 3)
    assert 0.5 < m["roc_auc_ovr_macro"] <= 1.0


def test_champion_rule_and_gates():
    c = {"cnn": {"macro_f1": 0.95, "latency_ms": 5.0}, "vit": {"macro_f1": 0.953, "latency_ms": 9.0}}
    assert choose_champion(c, "macro_f1", 0.005)[0] == "cnn"  # within tolerance: the faster wins
    assert choose_champion(c, "macro_f1", 0.0)[0] == "vit"
    noisy = {"cnn": {"macro_f1": 0.95, "latency_ms": 9.5}, "vit": {"macro_f1": 0.953, "latency_ms": 9.0}}
    assert choose_champion(noisy, "macro_f1", 0.005)[0] == "vit"  # 5 % faster is timing noise, not a reason
    with pytest.raises(QualityGateError, match=r"macro-F1 0\.4000 < evaluate\.min_macro_f1 0\.5"):
        check_quality_gates({"macro_f1": 0.4, "accuracy": 0.9}, 0.5, 0.5, "cnn")


def test_stratified_subset_keeps_every_class_and_its_share():
    from plantml.data import ManifestRow
    from plantml.pipeline import _stratified_subset

    rows = [ManifestRow(f"/{c}/{i}", c, "test", f"{c}{i}", 1, 1) for c, n in (("a", 80), ("b", 18), ("c", 2))
            for i in range(n)]
    sub = _stratified_subset(rows, 50, seed=0)
    counts = {c: sum(r.label == c for r in sub) for c in "abc"}
    assert counts == {"a": 40, "b": 9, "c": 1}
    assert sub == _stratified_subset(rows, 50, seed=0)
