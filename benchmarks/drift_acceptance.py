"""Drift acceptance pair on real photos: held-out PlantVillage images vs a shifted copy.

Splits every class of a PlantVillage-style folder three ways (deterministic for the seed):
a third trains a small stand-in model (``tiny_cnn``, 64 px, a few epochs: the drift test
needs a model's ``confidence``/``label`` columns, not a good model), a third is the
bundle's drift reference (exported with :func:`plantml.drift.reference_stats_step`, logits
PCA included), and a third is the held-out batch. A copy of the held-out batch with a
strong brightness/colour shift is written next to it. Then ``plantml drift`` runs on both
folders, exactly as an operator would.

Usage (writes only under --work)::

    python benchmarks/drift_acceptance.py --data ../shared/data/plantvillage-mini --work /tmp/drift_pv

Prints one JSON object: per batch the exit code, drift share, drifted columns, and the
share over the image-statistics columns alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

# Run as a script (python benchmarks/drift_acceptance.py), so the repository root is put on the path first.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from plantml import drift  # noqa: E402
from plantml.export import export_bundle  # noqa: E402
from plantml.imagestats import STAT_COLUMNS  # noqa: E402
from plantml.models import create_model  # noqa: E402
from plantml.preprocess import IMAGE_EXTENSIONS, InputSpec, load_image, preprocess_batch, softmax  # noqa: E402


def shift(img: Image.Image) -> Image.Image:
    """Darker (x0.6) with a warm cast (R x1.3, B x0.7): another camera / light."""
    arr = np.asarray(ImageEnhance.Brightness(img).enhance(0.6), dtype=np.float32) * np.array([1.3, 1.0, 0.7])
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def split_classes(data: Path, seed: int) -> dict[str, list[tuple[Path, str]]]:
    """Every class folder's images in three shuffled thirds: train, reference, held out."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[tuple[Path, str]]] = {"train": [], "reference": [], "heldout": []}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files = [files[i] for i in rng.permutation(len(files))]
        third = len(files) // 3
        for name, chunk in zip(parts, (files[:third], files[third:2 * third], files[2 * third:])):
            parts[name].extend((f, folder.name) for f in chunk)
    return parts


def train_stand_in(train: list[tuple[Path, str]], classes: list[str], size: int,
                   epochs: int) -> tuple[Any, InputSpec, np.ndarray]:
    """A ``tiny_cnn`` trained a few epochs: the model, its input spec and 8 parity inputs."""
    import torch

    torch.manual_seed(0)
    spec = InputSpec(size=size)
    x = torch.from_numpy(preprocess_batch([load_image(p) for p, _ in train], spec))
    y = torch.tensor([classes.index(c) for _, c in train])
    model = create_model("tiny_cnn", num_classes=len(classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), spec, x[:8].numpy()


def reference_logits(model: Any, spec: InputSpec, paths: list[Path]) -> np.ndarray:
    """The stand-in's logits on ``paths``, 64 images at a time."""
    import torch

    with torch.inference_mode():
        return np.concatenate([
            model(torch.from_numpy(preprocess_batch([load_image(p) for p in paths[i:i + 64]], spec))).numpy()
            for i in range(0, len(paths), 64)
        ])


def export_stand_in(model: Any, spec: InputSpec, parity: np.ndarray, classes: list[str],
                    reference: list[tuple[Path, str]], work: Path) -> tuple[Path, float]:
    """Export the stand-in with its drift reference statistics; the bundle and its reference accuracy."""
    ref_paths = [p for p, _ in reference]
    logits = reference_logits(model, spec, ref_paths)
    probs = softmax(logits)
    ref_acc = float(np.mean([classes[i] == c for i, (_, c) in zip(probs.argmax(1), reference)]))
    step = drift.reference_stats_step(ref_paths, [classes[i] for i in probs.argmax(1)], probs.max(1),
                                      embeddings=logits, embedding_source="logits")
    bundle, _ = export_bundle(
        model, out_root=work / "bundles", name="pv-drift-standin", architecture="tiny_cnn", classes=classes,
        input_spec=spec, parity_inputs=parity, metrics={"fp32": {"accuracy": ref_acc}},
        lineage={"data_manifest_sha256": None, "note": "stand-in model for the drift acceptance run"},
        version="standin-1", extra_steps=[step],
    )
    return bundle, ref_acc


def write_batches(heldout: list[tuple[Path, str]], work: Path) -> tuple[Path, Path]:
    """The held-out images copied as they are, and shifted: the two folders ``plantml drift`` reads."""
    held, shifted = work / "heldout", work / "shifted"
    for p, c in heldout:
        for root in (held, shifted):
            (root / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, held / c / p.name)
        shift(load_image(p)).save(shifted / c / (p.stem + ".jpg"), quality=92)
    return held, shifted


def run_drift(bundle: Path, name: str, folder: Path, work: Path) -> dict[str, Any]:
    """``python -m plantml.drift`` on one folder, as an operator runs it; its summary figures."""
    out = work / f"{name}_summary.json"
    cmd = [sys.executable, "-m", "plantml.drift", "--bundle", str(bundle), "--current", str(folder),
           "--report", str(work / f"{name}.html"), "--json", str(work / f"{name}.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    out.write_text(res.stdout)
    s = json.loads(res.stdout)
    stats = [c for c in STAT_COLUMNS if c in s["columns"]]
    return {
        "exit_code": res.returncode, "drift_detected": s["drift_detected"],
        "drift_share": round(s["drift_share"], 3),
        "n_drifted": s["n_drifted_columns"], "n_columns": s["n_columns"],
        "stats_only_share": round(sum(s["columns"][c]["drifted"] for c in stats) / len(stats), 3),
        "drifted_columns": s["drifted_columns"],
    }


def main() -> int:
    """Run the acceptance pair; exit 0 when the held-out batch passes and the shifted one drifts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.time()
    if args.work.exists():
        shutil.rmtree(args.work)
    parts = split_classes(args.data, args.seed)
    classes = sorted({c for _, c in parts["train"]})
    model, spec, parity = train_stand_in(parts["train"], classes, args.size, args.epochs)
    bundle, ref_acc = export_stand_in(model, spec, parity, classes, parts["reference"], args.work)
    held, shifted = write_batches(parts["heldout"], args.work)

    results: dict[str, object] = {
        "n_train": len(parts["train"]), "n_reference": len(parts["reference"]), "n_heldout": len(parts["heldout"]),
        "stand_in_accuracy_on_reference": round(ref_acc, 3),
    }
    for name, folder in (("heldout", held), ("shifted", shifted)):
        results[name] = run_drift(bundle, name, folder, args.work)
    results["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results, indent=1))
    ok = results["heldout"]["exit_code"] == 0 and results["shifted"]["exit_code"] == 1  # type: ignore[index]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
