"""Ablation of the cross-domain training choices: lab and field accuracy per variant.

One row = prepare the two shared sources (cached per data setting), train the CNN branch
only (the flow's champion on the real sample; the ViT doubles the time), calibrate the
temperature on validation, and score the test split per domain. Usage::

    nice -n 5 .venv/bin/python benchmarks/domain_ablation.py --variant mixed --out /tmp/ablation.jsonl
    nice -n 5 .venv/bin/python benchmarks/domain_ablation.py --variant mixed+weight3 --field-weight 3 ...
    nice -n 5 .venv/bin/python benchmarks/domain_ablation.py --variant mixed+bg0.5 --background 0.5 ...
    nice -n 5 .venv/bin/python benchmarks/domain_ablation.py --variant almost-lab-only --field-weight 0.01 ...

Each run appends one JSON line (lab/field accuracy, macro-F1, Wilson 95 % interval of
field accuracy, ECE per domain, coverage, the share of generated non-leaf images and non-leaf
photos abstained under the flow's whole rule (OOD score + confidence), train seconds, lscpu
flags). The field test
split holds 30 % of the field photos (``data.domains.field.split``: 72 of 240), never
trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

from typing import Any

# Run as a script (python benchmarks/domain_ablation.py), so the repository root is put on the path first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plantml import calibration as cal  # noqa: E402
from plantml.config import Params, load_params, parse_override  # noqa: E402
from plantml.evaluation import domain_metrics  # noqa: E402
from plantml.pipeline import _shortcut_report, _torch_proba, load_manifest  # noqa: E402
from plantml import ood  # noqa: E402
from plantml.pipeline import prepare, score_split, train_branch  # noqa: E402
from plantml.pipeline.beyond_split import non_leaf_inputs, non_leaf_report  # noqa: E402
from plantml.pipeline.evaluate_stage import _in_distribution_masks  # noqa: E402
from plantml.pipeline.results import CalibrationResult  # noqa: E402
from plantml.pipeline.scoring import fit_detector  # noqa: E402
from plantml.preprocess import InputSpec, softmax  # noqa: E402
from plantml.shards import ShardIndex, load_index  # noqa: E402
from plantml.training import TrainResult, load_checkpoint  # noqa: E402

log = logging.getLogger("domain_ablation")
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def cpu_flags() -> str:
    """The lscpu model and the SIMD flags that matter for these timings."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    simd = sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")))
    return f"{model}; {' '.join(simd)}"


def mask_stats(lab: str, field: str, n_lab: int = 300, n_field: int = 240, size: int = 160) -> dict:
    """How well the plain-backdrop test separates the two shared sets (the figures in plantml/backdrop.py)."""
    import random

    import numpy as np
    from PIL import Image

    from plantml import backdrop

    rng = random.Random(0)
    pick = {name: rng.sample(sorted(Path(root).glob("*/*.jpg")), n) for name, root, n in
            (("lab", lab, n_lab), ("field", field, n_field))}
    out = {}
    for name, paths in pick.items():
        px = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths]
        res = np.array([backdrop.border_residual(x) for x in px])
        masks = [backdrop.leaf_mask(x) for x in px]
        out[name] = {"n": len(px), "residual_p1_p5_p50_p95": np.percentile(res, [1, 5, 50, 95]).round(1).tolist(),
                     "mask_found": float(np.mean([m is not None for m in masks])),
                     "leaf_share_median": float(np.median([m.mean() for m in masks if m is not None] or [np.nan]))}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, help="row name (with --mask-stats: any)")
    ap.add_argument("--mask-stats", action="store_true", help="only measure the plain-backdrop mask on both sets")
    ap.add_argument("--lab", default=str(SHARED / "plantvillage-mini"))
    ap.add_argument("--field", default=str(SHARED / "field-apple"))
    ap.add_argument("--field-weight", type=float, default=1.0)
    ap.add_argument("--background", type=float, default=0.0, help="train.background_replace")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="more overrides key=value")
    ap.add_argument("--work", default="/tmp/plantml-ablation")
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-only", action="store_true", help="score the variant's existing checkpoint again")
    ap.add_argument("--index", help="with --eval-only: a prepared store to score (e.g. a flow run's "
                                    ".metaflow/.plantml/PlantDiseaseFlow/RUN/data)")
    ap.add_argument("--train-dir", help="with --eval-only: a branch's output (result.json + model.pt), e.g. "
                                        "artifacts/train/RUN/cnn")
    ap.add_argument("--whole-rule", action="store_true",
                    help="coverage under the flow's whole abstain rule (OOD score + confidence), not confidence alone")
    return ap.parse_args(argv)


def append_row(out: str, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line to ``out`` and print it."""
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def variant_params(args: argparse.Namespace) -> Params:
    """``params.yaml`` with the two shared sources and the variant's overrides."""
    overrides = {"data.data_dir": f"lab={args.lab},field={args.field}",
                 "data.domains": {"field": {"weight": args.field_weight, "split": [0.5, 0.2, 0.3]}},
                 "train.background_replace": args.background}
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    overrides.update(dict(parse_override(s) for s in args.set))
    return load_params(None, overrides)


def prepared_index(params: Params, work: str) -> ShardIndex:
    """The prepared data, cached under ``work`` per data setting (and image size)."""
    data_key = hashlib.sha256(json.dumps([params.to_dict()["data"], params.train.image_size]).encode()).hexdigest()[:12]
    store = Path(work) / f"prep-{data_key}"
    if not (store / "index.json").is_file():
        prepare(params, store=str(store), out_dir=str(store), progress=False)
    return load_index(str(store))


def trained_branch(args: argparse.Namespace, params: Params, index: ShardIndex) -> tuple[TrainResult, float]:
    """The variant's CNN branch and its training seconds: trained now, or (``--eval-only``) as saved."""
    out_dir = Path(args.train_dir) if args.train_dir else Path(args.work) / f"train-{args.variant}"
    t0 = time.time()
    if args.eval_only:
        result = TrainResult(**{k: v for k, v in json.loads((out_dir / "result.json").read_text()).items()
                                if k in TrainResult.__dataclass_fields__})
        result.checkpoint_path = str(out_dir / "model.pt")
        return result, result.train_seconds
    result = train_branch(params, "cnn", index, out_dir, parallel_branches=1, progress=False)
    return result, time.time() - t0


def score_variant(params: Params, result: TrainResult, index: ShardIndex, whole_rule: bool = False) -> dict[str, Any]:
    """Temperature, abstention threshold, per-domain test metrics and the shortcut check of one branch."""
    model, _ = load_checkpoint(result.checkpoint_path)
    spec = InputSpec(size=result.image_size, mean=tuple(result.mean), std=tuple(result.std))
    rows = load_manifest(index)
    detector = fit_detector(params, model, index, spec)
    val, test = (score_split(model, index, s, spec, detector=detector, rows=rows) for s in ("val", "test"))
    ood_threshold = ood.choose_ood_threshold(val.ood_scores, params.calibration.ood_acceptance)
    # The flow's calibration: temperature + confidence threshold on validation, lowered to
    # calibration.domain_min_coverage per domain when that is set. Coverage is the confidence
    # rule's unless --whole-rule (then the OOD score counts too, with the flow's own masks).
    c = params.calibration
    masks = _in_distribution_masks(params, detector, val, test) if whole_rule else {}
    calib = cal.calibration_summary(val.logits, val.labels, test.logits, test.labels, c.target_precision,
                                    c.min_coverage, **masks, val_domains=val.domains,
                                    domain_min_coverage=c.domain_min_coverage)
    temperature = calib["temperature"]
    by_domain = domain_metrics(test.labels, softmax(test.logits, temperature), test.domains, index.classes,
                               calib["abstain_threshold"], masks.get("test_in_distribution"))
    shortcut = _shortcut_report(params, _torch_proba(model, spec, temperature), index, rows, index.classes)
    non_leaf = non_leaf_report(model, spec, CalibrationResult.from_summary(calib), detector, ood_threshold,
                               *non_leaf_inputs(params, spec.size))
    return {"temperature": temperature, "abstain_threshold": calib["abstain_threshold"],
            "domain_cap": calib["domain_cap"], "by_domain": by_domain, "shortcut": shortcut,
            "non_leaf": {k: v for k, v in non_leaf.items() if not k.endswith("scores")}}


def main(argv: list[str] | None = None) -> int:
    """Measure one variant (or only the backdrop mask) and append its JSON line to ``--out``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mask_stats:
        append_row(args.out, {"mask_stats": mask_stats(args.lab, args.field), "cpu": cpu_flags()})
        return 0
    params = variant_params(args)
    index = load_index(args.index) if args.index else prepared_index(params, args.work)
    result, train_s = trained_branch(args, params, index)
    scores = score_variant(params, result, index, args.whole_rule)
    append_row(args.out, {
        "variant": args.variant, "field_weight": args.field_weight, "background_replace": args.background,
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "train_seconds": round(train_s, 1),
        "temperature": scores["temperature"], "abstain_threshold": scores["abstain_threshold"],
        "domains": {d: {k: m[k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "ece", "coverage",
                                          "accuracy_on_answered")}
                    for d, m in scores["by_domain"].items()},
        "shortcut": {k: scores["shortcut"].get(k) for k in ("n", "n_no_mask", "target_rate", "target_rate_original",
                                                            "accuracy_original", "accuracy_pasted")},
        "non_leaf": scores["non_leaf"], "outlier_exposure": params.train.outlier_exposure,
        "whole_rule": args.whole_rule, "domain_min_coverage": params.calibration.domain_min_coverage,
        "domain_cap": scores["domain_cap"],
        "frozen_blocks": params.train.models["cnn"].frozen_blocks,
        "image_size": params.train.image_size, "epochs": params.train.epochs, "ema_decay": params.train.ema_decay,
        "patience": params.train.patience, "seed": params.train.seed, "threads": result.threads,
        "cpu": cpu_flags(), "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M"),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
