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

import numpy as np
from PIL import Image, ImageEnhance

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from plantml.imagestats import STAT_COLUMNS  # noqa: E402
from plantml.preprocess import IMAGE_EXTENSIONS, load_image  # noqa: E402


def shift(img: Image.Image) -> Image.Image:
    """Darker (x0.6) with a warm cast (R x1.3, B x0.7): another camera / light."""
    arr = np.asarray(ImageEnhance.Brightness(img).enhance(0.6), dtype=np.float32) * np.array([1.3, 1.0, 0.7])
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def split_classes(data: Path, seed: int) -> dict[str, list[tuple[Path, str]]]:
    rng = np.random.default_rng(seed)
    parts: dict[str, list[tuple[Path, str]]] = {"train": [], "reference": [], "heldout": []}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files = [files[i] for i in rng.permutation(len(files))]
        third = len(files) // 3
        for name, chunk in zip(parts, (files[:third], files[third:2 * third], files[2 * third:])):
            parts[name].extend((f, folder.name) for f in chunk)
    return parts


def train_stand_in(train: list[tuple[Path, str]], classes: list[str], size: int, epochs: int):
    import torch

    from plantml.models import create_model
    from plantml.preprocess import InputSpec, preprocess_batch

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from plantml import drift
    from plantml.export import export_bundle
    from plantml.preprocess import preprocess_batch, softmax

    t0 = time.time()
    if args.work.exists():
        shutil.rmtree(args.work)
    parts = split_classes(args.data, args.seed)
    classes = sorted({c for _, c in parts["train"]})
    model, spec, parity = train_stand_in(parts["train"], classes, args.size, args.epochs)

    ref_paths = [p for p, _ in parts["reference"]]
    with torch.inference_mode():
        logits = np.concatenate([
            model(torch.from_numpy(preprocess_batch([load_image(p) for p in ref_paths[i:i + 64]], spec))).numpy()
            for i in range(0, len(ref_paths), 64)
        ])
    probs = softmax(logits)
    ref_acc = float(np.mean([classes[i] == c for i, (_, c) in zip(probs.argmax(1), parts["reference"])]))
    step = drift.reference_stats_step(ref_paths, [classes[i] for i in probs.argmax(1)], probs.max(1),
                                      embeddings=logits, embedding_source="logits")
    bundle, _ = export_bundle(
        model, out_root=args.work / "bundles", name="pv-drift-standin", architecture="tiny_cnn", classes=classes,
        input_spec=spec, parity_inputs=parity, metrics={"fp32": {"accuracy": ref_acc}},
        lineage={"data_manifest_sha256": None, "note": "stand-in model for the drift acceptance run"},
        version="standin-1", extra_steps=[step],
    )
    held, shifted = args.work / "heldout", args.work / "shifted"
    for p, c in parts["heldout"]:
        for root in (held, shifted):
            (root / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, held / c / p.name)
        shift(load_image(p)).save(shifted / c / (p.stem + ".jpg"), quality=92)

    results: dict[str, object] = {
        "n_train": len(parts["train"]), "n_reference": len(ref_paths), "n_heldout": len(parts["heldout"]),
        "stand_in_accuracy_on_reference": round(ref_acc, 3),
    }
    for name, folder in (("heldout", held), ("shifted", shifted)):
        out = args.work / f"{name}_summary.json"
        cmd = [sys.executable, "-m", "plantml.drift", "--bundle", str(bundle), "--current", str(folder),
               "--report", str(args.work / f"{name}.html"), "--json", str(args.work / f"{name}.json")]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        out.write_text(res.stdout)
        s = json.loads(res.stdout)
        stats = [c for c in STAT_COLUMNS if c in s["columns"]]
        results[name] = {
            "exit_code": res.returncode, "drift_detected": s["drift_detected"],
            "drift_share": round(s["drift_share"], 3),
            "n_drifted": s["n_drifted_columns"], "n_columns": s["n_columns"],
            "stats_only_share": round(sum(s["columns"][c]["drifted"] for c in stats) / len(stats), 3),
            "drifted_columns": s["drifted_columns"],
        }
    results["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results, indent=1))
    ok = results["heldout"]["exit_code"] == 0 and results["shifted"]["exit_code"] == 1  # type: ignore[index]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
