"""Export a trained model to ONNX (FP32) and OpenVINO IR, check parity, write a bundle.

Parity: ONNX Runtime and OpenVINO outputs are compared with torch eager on the same
inputs at batch sizes 1, 2 and 8; the max absolute logit difference of each is recorded
in the bundle metadata. Both runtimes are opened by :mod:`plantml.runtime` with the
service's settings, so parity is measured on the session that will serve. OpenVINO's CPU
plugin runs FP32 models in bfloat16 on CPUs with AVX-512 BF16 unless told otherwise, so
the parity check (and any FP32 claim) uses ``INFERENCE_PRECISION_HINT=f32``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from plantml.bundle import METADATA_FILE, SCHEMA_VERSION, BundleWriter

# The exported models are checked in the session the service runs (plantml.runtime);
# the runner names are re-exported for callers that have always imported them from here.
from plantml.runtime import onnxruntime_runner, openvino_runner  # noqa: F401

log = logging.getLogger(__name__)

PARITY_BATCH_SIZES = (1, 2, 8)
#: ``metadata["calibration"]`` of a bundle exported without one: plain softmax, never abstain.
NO_CALIBRATION: Mapping[str, float] = {"temperature": 1.0, "abstain_threshold": 0.0}


class ExportError(RuntimeError):
    """Export failed or an exported model disagrees with torch beyond tolerance."""


def export_onnx(model: Any, path: Path, image_size: int, opset: int = 18) -> Path:
    """Export ``model`` (a torch module) to ONNX with a dynamic batch dimension.

    The TorchScript-based exporter (``dynamo=False``) is tried first because it is fast
    and handles the timm CNNs and ViTs used here; the ``torch.export`` path is the
    fallback. Either way the caller checks parity at batch 1, 2 and 8.
    """
    import torch

    model = model.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.randn(2, 3, image_size, image_size)
    # A ScoredClassifier also returns the OOD score: a second named output.
    outputs = list(getattr(model, "output_names", ("logits",)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (dummy,), str(path), dynamo=False, opset_version=opset,
                input_names=["input"], output_names=outputs,
                dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            )
        except Exception as exc:  # noqa: BLE001 - fall back to the torch.export-based exporter
            log.warning("legacy ONNX export failed (%s); trying dynamo=True", exc)
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                model, (dummy,), str(path), dynamo=True, opset_version=opset,
                input_names=["input"], output_names=outputs, dynamic_shapes=({0: batch},),
            )
    _merge_external_data(path)
    return path


def _merge_external_data(path: Path) -> None:
    """Keep the ONNX model a single file (small models can be written with external data)."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    leftovers = [p for p in path.parent.glob(path.name + ".data")]
    if leftovers:
        onnx.save_model(model, str(path), save_as_external_data=False)
        for p in leftovers:
            p.unlink()


def export_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """Convert an ONNX model to OpenVINO IR, keeping FP32 weights (no FP16 compression)."""
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(xml_path), compress_to_fp16=False)
    return xml_path


def torch_runner(model: Any, output: int | None = 0) -> Callable[[np.ndarray], Any]:
    """A ``batch -> logits`` function over torch eager (CPU, no grad).

    ``output``: which output of a multi-output model to return; ``None``: all, as a list.
    """
    import torch

    model = model.eval().cpu()

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            res = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        outs = [t.numpy() for t in res] if isinstance(res, (tuple, list)) else [res.numpy()]
        return outs if output is None else outs[output]

    return run


def parity_report(
    reference: Callable[[np.ndarray], np.ndarray],
    candidates: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    inputs: np.ndarray,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    relative: bool = False,
) -> dict[str, dict[str, float]]:
    """Max abs logit difference of each candidate vs the reference, per batch size.

    Args:
        reference: torch eager runner.
        candidates: ``{"onnxruntime_fp32": fn, ...}``.
        inputs: at least ``max(batch_sizes)`` preprocessed images (NCHW float32).
        relative: divide each difference by ``max(1, |reference|)`` (for the OOD score, a
            distance whose scale has nothing to do with the logits').

    Returns:
        ``{"onnxruntime_fp32": {"batch_1": d, "batch_2": d, "batch_8": d, "max": d}, ...}``
    """
    out: dict[str, dict[str, float]] = {}
    if len(inputs) < max(batch_sizes):
        reps = int(np.ceil(max(batch_sizes) / max(1, len(inputs))))
        inputs = np.concatenate([inputs] * reps)
    for name, fn in candidates.items():
        diffs = {}
        for b in batch_sizes:
            x = inputs[:b]
            ref = reference(x)
            got = fn(x)
            if got.shape != ref.shape:
                raise ExportError(f"{name}: output shape {got.shape} != torch {ref.shape} at batch {b}")
            scale = np.maximum(1.0, np.abs(ref)) if relative else 1.0
            diffs[f"batch_{b}"] = float(np.max(np.abs(got - ref) / scale))
        diffs["max"] = max(diffs.values())
        out[name] = diffs
    return out


def _check_parity(report: Mapping[str, Mapping[str, float]], tolerance: float, what: str) -> None:
    """Raise :class:`ExportError` naming every runtime whose ``what`` differs beyond ``tolerance``."""
    worst = {k: v["max"] for k, v in report.items()}
    log.info("parity vs torch (%s): %s", what, worst)
    bad = {k: v for k, v in worst.items() if v > tolerance}
    if bad:
        raise ExportError(f"exported model disagrees with torch beyond {tolerance}: "
                          + ", ".join(f"{k} {what} {v:.2e}" for k, v in bad.items()))


def git_commit() -> str | None:
    """The current git commit of the working tree, or ``None`` outside a repository."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def new_version() -> str:
    """A sortable, unique-enough bundle version: UTC timestamp."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def export_bundle(
    model: Any,
    *,
    out_root: Path,
    name: str,
    architecture: str,
    classes: list[str],
    input_spec: Any,
    parity_inputs: np.ndarray,
    metrics: Mapping[str, Any],
    lineage: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    opset: int = 18,
    parity_tolerance: float = 1e-4,
    version: str | None = None,
    extra_steps: Sequence[Callable[[BundleWriter, dict[str, Any]], None]] = (),
) -> tuple[Path, dict[str, Any]]:
    """Export ``model`` to ONNX + OpenVINO, check parity, and write a bundle atomically.

    Args:
        model: trained torch module returning logits (and the OOD score, per ``output_names``).
        out_root: folder that receives ``<name>-<version>/`` (and a ``latest`` link).
        name: the bundle's model name.
        architecture: the model's architecture name (as the model registry knows it).
        classes: class names in output order.
        input_spec: the model input (an ``InputSpec`` or its dict).
        parity_inputs: preprocessed real images (NCHW) used for the parity check.
        metrics: ``{"fp32": {...}}`` test metrics to store.
        lineage: run ids, data manifest hash; ``git_commit`` and ``created_at`` are added.
        params: the resolved parameters to store with the bundle.
        calibration: temperature and abstention settings (default: none).
        opset: ONNX opset.
        parity_tolerance: largest tolerated difference from torch.
        version: the bundle version (default: a UTC timestamp).
        extra_steps: callables ``(writer, metadata) -> None`` run before commit, e.g. INT8
            quantization or reference statistics; they may add files and metadata keys.

    Returns:
        ``(bundle_path, metadata)``: the metadata as written, with the files list and hashes
        the writer filled in.

    Raises:
        ExportError: if a runtime's output differs from torch by more than the tolerance.
    """
    version = version or new_version()
    spec_dict = input_spec.to_dict() if hasattr(input_spec, "to_dict") else dict(input_spec)
    with BundleWriter(out_root, name, version) as writer:
        _write_fp32_models(writer, model, spec_dict["size"], opset)
        outputs, parity = _check_all_outputs(model, writer.dir, parity_inputs, parity_tolerance)
        metadata: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "outputs": outputs, "name": name, "version": version,
            "architecture": architecture, "classes": list(classes), "input": spec_dict, "files": [],
            "metrics": dict(metrics), "calibration": dict(calibration or NO_CALIBRATION), "parity": parity,
            "lineage": _complete_lineage(lineage), "params": dict(params or {}),
        }
        for step in extra_steps:
            step(writer, metadata)
        path = writer.commit(metadata)
    return path, json.loads((path / METADATA_FILE).read_text())


def _write_fp32_models(writer: BundleWriter, model: Any, image_size: int, opset: int) -> None:
    """Export ``model.onnx`` and ``openvino/model.xml|bin`` into the bundle and register them (FP32)."""
    onnx_path = export_onnx(model, writer.dir / "model.onnx", image_size, opset)
    writer.add_file("model.onnx", fmt="onnx", runtime="onnxruntime", precision="fp32")
    export_openvino(onnx_path, writer.dir / "openvino" / "model.xml")
    writer.add_file("openvino/model.xml", fmt="openvino", runtime="openvino", precision="fp32")
    writer.add_file("openvino/model.bin", fmt="openvino", runtime="openvino", precision="fp32", role="weights")


def _check_all_outputs(model: Any, bundle_dir: Path, parity_inputs: np.ndarray,
                       tolerance: float) -> tuple[list[str], dict[str, Any]]:
    """Compare every output of both runtimes with torch, or raise ExportError.

    Logits are compared by absolute difference; other outputs (the OOD score) by relative one.

    Returns:
        ``(the model's output names, metadata["parity"])``.
    """
    outputs = list(getattr(model, "output_names", ("logits",)))
    # One session per runtime, all outputs; each comparison picks its output.
    reference = torch_runner(model, output=None)
    runtimes = {
        "onnxruntime_fp32": onnxruntime_runner(bundle_dir / "model.onnx", output=None),
        "openvino_fp32": openvino_runner(bundle_dir / "openvino" / "model.xml", output=None),
    }
    reports = {}
    for index, output in enumerate(outputs):
        relative = output != "logits"
        reports[output] = parity_report(
            lambda x, i=index: reference(x)[i],
            {name: (lambda x, r=run, i=index: r(x)[i]) for name, run in runtimes.items()},
            parity_inputs, relative=relative,
        )
        _check_parity(reports[output], tolerance, f"max {'relative' if relative else 'abs'} {output} diff")
    parity_meta: dict[str, Any] = {"tolerance": tolerance, "max_abs_diff": reports["logits"]}
    if "ood_score" in reports:
        parity_meta["ood_score_max_rel_diff"] = reports["ood_score"]
    return outputs, parity_meta


def _complete_lineage(lineage: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's lineage plus the git commit (unless given) and the creation time."""
    return {
        **dict(lineage),
        "git_commit": lineage.get("git_commit") or git_commit(),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
