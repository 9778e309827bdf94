"""The edge student: the distillation loss, the distill stage on tiny shards, and its gate in the bundle.

Tiny synthetic leaves (three colours, 32 px shards); the teacher and the student are the
3k-parameter ``tiny_cnn``, the student at 16 px. The whole file runs in a few seconds.
"""

import json

import numpy as np
import pytest

from plantml.bundle import BundleError, load_bundle, load_student_bundle, student_block
from plantml.config import load_params

TINY = {"train.image_size": 32, "train.batch_size": 8, "train.patience": 5, "train.background_replace": 0.0,
        "student.arch": "tiny_cnn", "student.image_size": 16, "student.epochs": 2, "student.lr": 0.03,
        "student.frozen_blocks": 0, "calibration.ood_components": 4, "export.int8.enabled": False}


def tiny_params(**extra):
    return load_params(overrides={**TINY, **extra})


def test_distillation_loss_is_hintons():
    import torch
    import torch.nn.functional as F

    from plantml.training.distill import distillation_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    # alpha 0: plain cross-entropy; alpha 1 and the teacher's own logits: zero
    assert torch.allclose(distillation_loss(s, t, y, 3.0, 0.0), F.cross_entropy(s, y))
    assert float(distillation_loss(t, t, y, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    kl = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 1.0), kl, atol=1e-6)
    # the soft term's gradient reaches the student only
    s.requires_grad_(True)
    distillation_loss(s, t, y, 2.0, 0.5).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def _teacher(index, tmp_path):
    """A tiny CNN trained on the 32 px shards (a few full-batch steps), saved as a checkpoint."""
    from types import SimpleNamespace

    import torch

    from plantml import shards as sh
    from plantml.models import create_model
    from plantml.preprocess import InputSpec, normalize_batch
    from plantml.training import save_checkpoint

    torch.manual_seed(0)
    samples = list(sh.iter_split(index, "train"))
    spec = InputSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = torch.from_numpy(normalize_batch(np.stack([s.pixels for s in samples]), spec))
    y = torch.tensor([s.label for s in samples])
    model = create_model("tiny_cnn", num_classes=len(index.classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    result = {"arch": "tiny_cnn", "classes": list(index.classes), "image_size": 32, "mean": list(spec.mean),
              "std": list(spec.std)}
    path = tmp_path / "teacher.pt"
    save_checkpoint(model.eval().state_dict(), SimpleNamespace(**result), path)
    report = {"champion": "cnn", "models": {"cnn": {"accuracy": 1.0, "latency_ms": 0.1}}}
    return result, str(path), report


@pytest.fixture(scope="module")
def distilled(tiny_shards, tmp_path_factory):
    """``(index, teacher result, teacher checkpoint, report, student result)``."""
    from plantml.pipeline import distill_student

    _, _, index = tiny_shards
    tmp = tmp_path_factory.mktemp("distill")
    teacher, ckpt, report = _teacher(index, tmp)
    rows = []
    student = distill_student(tiny_params(), report, teacher, ckpt, index, tmp / "student", progress=False,
                              on_epoch_end=rows.append)
    return index, teacher, ckpt, report, student, rows


def test_distill_student_trains_and_evaluates(distilled):
    index, teacher, ckpt, report, student, rows = distilled
    assert student["status"] == "trained", student
    assert student["init"].startswith("champion") and student["image_size"] == 16
    assert len(student["history"]) == 2 == len(rows) and {"teacher_agreement", "val_macro_f1"} <= set(rows[0])
    # three flat colours: the student at 16 px learns them from the teacher
    assert student["metrics"]["accuracy"] >= 0.6, student["metrics"]
    assert set(student["by_domain"]) == {"lab"}
    assert student["ood"]["threshold"] > 0 and 0 < student["calibration"]["temperature"]
    saved = json.loads((__import__("pathlib").Path(student["checkpoint"]).parent / "result.json").read_text())
    assert saved["checkpoint"] == student["checkpoint"]

    from plantml.training import load_checkpoint

    model, meta = load_checkpoint(student["checkpoint"])
    assert meta["image_size"] == 16 and meta["arch"] == "tiny_cnn"


def test_the_student_keeps_the_moving_average_of_its_weights(distilled, tmp_path):
    """``train.ema_decay`` applies to the student too: same training steps, the average kept."""
    import torch

    from plantml.pipeline import distill_student
    from plantml.training import load_checkpoint

    index, teacher, ckpt, report, _, _ = distilled
    runs = {decay: distill_student(tiny_params(**{"train.ema_decay": decay}), report, teacher, ckpt, index,
                                   tmp_path / str(decay), progress=False) for decay in (0.0, 0.9)}
    raw, averaged = runs[0.0]["history"], runs[0.9]["history"]
    assert [h["train_loss"] for h in averaged] == pytest.approx([h["train_loss"] for h in raw], rel=1e-6)
    kept = load_checkpoint(runs[0.9]["checkpoint"])[0].state_dict()
    plain = load_checkpoint(runs[0.0]["checkpoint"])[0].state_dict()
    assert any(not torch.equal(kept[k], plain[k]) for k in kept if kept[k].is_floating_point())


def test_distill_skips_a_student_that_is_not_smaller(distilled, tmp_path):
    from plantml.pipeline import distill_student

    index, teacher, ckpt, report, _, _ = distilled
    out = distill_student(tiny_params(**{"student.image_size": 32}), report, teacher, ckpt, index, tmp_path)
    assert out["status"] == "skipped" and "not below the champion's input side 32" in out["reason"]
    out = distill_student(tiny_params(**{"student.enabled": False}), report, teacher, ckpt, index, tmp_path)
    assert out["status"] == "disabled"


def export_with_student(out_root, params, index, teacher_ckpt, student, version="1"):
    """The champion exported with the student step (the export stage's last steps, without the report)."""
    from plantml.export import export_bundle
    from plantml.pipeline import student_export_step
    from plantml.pipeline.samples import domains_of, load_manifest, subset_samples
    from plantml.preprocess import InputSpec, normalize_batch
    from plantml.training import load_checkpoint

    model, meta = load_checkpoint(teacher_ckpt)
    spec = InputSpec(size=32, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    rows = load_manifest(index)
    gate = subset_samples(index, "test", 100, 42, rows)
    x = normalize_batch(np.stack([s.pixels for s in gate]), spec)
    lineage = {"metaflow_run_id": None, "mlflow_run_id": None, "data_manifest_sha256": "test"}
    return export_bundle(model, out_root=out_root, name="tiny-student-test", architecture="tiny_cnn",
                         classes=list(index.classes), input_spec=spec, parity_inputs=x[:8],
                         metrics={"fp32": {"accuracy": 1.0}}, lineage=lineage, version=version,
                         extra_steps=[student_export_step(params, student, index, gate,
                                                          domains_of([s.key for s in gate], rows), lineage)])


def test_student_kept_when_it_passes_its_gate(distilled, tmp_path):
    index, _, ckpt, _, student, _ = distilled
    params = tiny_params(**{"student.min_speedup": 0.001, "student.max_accuracy_drop": 1.0})
    path, meta = export_with_student(tmp_path, params, index, ckpt, student)
    block = meta["student"]
    assert block["kept"] and block["path"] == "student" and block["gate"]["passed"], block
    assert {"all", "lab"} <= set(block["gate"]["champion_fp32"]) and block["gate"]["speedup"] > 0
    # the champion's readers see only the champion's files; the student loads through its pin
    champion = load_bundle(path)
    assert all(not f["path"].startswith("student/") for f in champion.metadata["files"])
    sub = load_student_bundle(path)
    # its input is the champion's (32 px); the model downscales to 16 px inside
    assert sub.input_spec.size == 32 and sub.metadata["model_resolution"] == 16
    assert sub.classes == champion.classes and sub.ood_threshold > 0
    assert student_block(path)["image_size"] == 16 and block["models"] == ["onnxruntime_fp32", "openvino_fp32"]
    # a student whose metadata was swapped is refused
    (path / "student" / "metadata.json").write_text((path / "student" / "metadata.json").read_text() + " ")
    with pytest.raises(BundleError, match="pinned digest"):
        load_student_bundle(path)


def test_student_left_out_with_the_reason_when_not_faster(distilled, tmp_path):
    index, _, ckpt, _, student, _ = distilled
    params = tiny_params(**{"student.min_speedup": 1000})
    path, meta = export_with_student(tmp_path, params, index, ckpt, student)
    block = meta["student"]
    assert not block["kept"] and block["status"] == "rejected" and "not faster enough" in block["reason"]
    assert not (path / "student").exists() and student_block(path) is None
    with pytest.raises(BundleError, match="no edge student .*not faster enough"):
        load_student_bundle(path)


def test_bundle_explains_a_missing_student(distilled, tmp_path):
    index, _, ckpt, _, _, _ = distilled
    _, meta = export_with_student(tmp_path, tiny_params(), index, ckpt, None)
    assert meta["student"] == {"kept": False, "status": "absent",
                               "reason": "no student was distilled for this run (the flow's distill step, "
                                         "`plantml distill`)"}
