"""The real sample and the bundle trained on it, for the integration checks on real photos.

The sample is ``PLANTML_REAL_SAMPLE`` or ``../shared/data/plantvillage-mini``; the bundle is
``PLANTML_EVAL_BUNDLE`` or ``artifacts/real-sample/bundle`` (``make real-sample-bundle``).
Without them a check skips saying why, unless ``PLANTML_REQUIRE_REAL_SAMPLE=1`` (set by
``.ci/run``): then it fails, so CI can never pass without having run it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "plantvillage-mini"
REAL_SAMPLE_BUNDLE = REPO_ROOT / "artifacts" / "real-sample" / "bundle"


def missing(reason: str):
    """Skip, or fail where CI requires the real-sample check (``PLANTML_REQUIRE_REAL_SAMPLE=1``)."""
    if os.environ.get("PLANTML_REQUIRE_REAL_SAMPLE", "") not in ("", "0"):
        pytest.fail(f"PLANTML_REQUIRE_REAL_SAMPLE is set but {reason}")
    pytest.skip(reason)


def real_sample_bundle() -> tuple[Path, Path]:
    """The sample and the bundle for the integration checks, or skip (fail in CI) saying what is missing."""
    sample = Path(os.environ.get("PLANTML_REAL_SAMPLE") or SHARED_SAMPLE)
    if not sample.is_dir():
        missing(f"real sample not found at {sample} (set PLANTML_REAL_SAMPLE)")
    env = os.environ.get("PLANTML_EVAL_BUNDLE")
    bundle = Path(env) if env else REAL_SAMPLE_BUNDLE
    if not (bundle / "metadata.json").is_file():
        missing(f"no trained bundle at {bundle}: run `make real-sample-bundle` "
                "(or set PLANTML_EVAL_BUNDLE to a bundle directory)")
    return sample, bundle


def bundle_splits(bundle_dir: Path) -> dict[str, str]:
    """``{relative path: split}`` from the manifest the bundle was trained on ({} if not found)."""
    meta = json.loads((bundle_dir / "metadata.json").read_text())
    manifest = os.environ.get("PLANTML_EVAL_MANIFEST")
    if not manifest:
        prepared = Path(meta.get("params", {}).get("data", {}).get("prepared_dir") or "")
        folder = prepared if prepared.is_absolute() else REPO_ROOT / prepared
        summary = folder / "summary.json"
        if not summary.is_file():
            return {}
        digest = json.loads(summary.read_text()).get("manifest_sha256")
        # The prepared folder may have been overwritten since: use it only if it is the bundle's own.
        if not digest or digest != meta.get("lineage", {}).get("data_manifest_sha256"):
            return {}
        manifest = folder / "manifest.csv"
    with open(manifest, newline="") as f:
        return {row["path"]: row["split"] for row in csv.DictReader(f)}


def held_out_photos(sample: Path, bundle_dir: Path, count: int) -> list[tuple[Path, str]]:
    """``count`` held-out (test-split) photos of the sample with their class, spread over the classes.

    The first test photo of every class in sorted order, then the second of each, and so on,
    so 20 photos cover 20 classes. Missing (or failing in CI) when the manifest is not found.
    """
    splits = bundle_splits(bundle_dir)
    if not splits:
        missing(f"the manifest of {bundle_dir} was not found (set PLANTML_EVAL_MANIFEST)")
    per_class: dict[str, list[str]] = {}
    for path, split in sorted(splits.items()):
        if split == "test" and (sample / path).is_file():
            per_class.setdefault(path.split("/")[0], []).append(path)
    picked: list[tuple[Path, str]] = []
    for rank in range(max((len(v) for v in per_class.values()), default=0)):
        for cls in sorted(per_class):
            if rank < len(per_class[cls]) and len(picked) < count:
                picked.append((sample / per_class[cls][rank], cls))
    if len(picked) < count:
        missing(f"only {len(picked)} held-out photos of {sample} in the manifest of {bundle_dir}")
    return picked
