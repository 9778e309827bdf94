"""Which generated non-leaf images a bundle answers instead of abstaining on, and as what.

The evaluate report gives only the share abstained (``non_leaf.abstain_rate``); this lists
the ones that got through with their kind, OOD score, confidence and predicted class, on the
same 60 images the flow checks (``plantml.pipeline.beyond_split.non_leaf_inputs``, seed
``data.seed``). Usage::

    python benchmarks/non_leaf_answers.py artifacts/bundles/latest
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script (python benchmarks/non_leaf_answers.py), so the repository root is put on the path first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plantml.bundle import load_bundle  # noqa: E402
from plantml.config import load_params  # noqa: E402
from plantml.pipeline.beyond_split import non_leaf_inputs  # noqa: E402
from plantml.preprocess import preprocess_batch  # noqa: E402
from plantml.robustness.non_leaf import NON_LEAF_KINDS  # noqa: E402
from plantml.runtime import Calibration, batch_runner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print one JSON line per answered non-leaf image, then a summary line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    spec = bundle.input_spec
    model = next(f for f in bundle.metadata["files"]
                 if f.get("runtime") == "onnxruntime" and f.get("precision") == "fp32")
    run = batch_runner(bundle.root / model["path"], output=None)
    images, _ = non_leaf_inputs(load_params(), spec.size)
    decisions = Calibration.of(bundle).apply(run(preprocess_batch(images, spec)))
    for i, abstained in enumerate(decisions.abstained):
        if not abstained:
            p = decisions.probabilities[i]
            print(json.dumps({"image": i, "kind": NON_LEAF_KINDS[i % len(NON_LEAF_KINDS)],
                              "ood_score": round(float(decisions.ood_scores[i]), 3)
                              if decisions.ood_scores is not None else None,
                              "confidence": round(float(p.max()), 3), "class": bundle.classes[int(p.argmax())]}))
    print(json.dumps({"n": len(images), "abstained": float(decisions.abstained.mean()),
                      "confidence_threshold": bundle.abstain_threshold, "ood_threshold": bundle.ood_threshold}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
