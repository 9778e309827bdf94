"""Baseline for the serving benchmark: a plain Flask + PyTorch-eager prediction service.

NOT part of the product. It serves the same model the way a typical PyTorch web service
does: decode with PIL, torchvision transforms (resize shorter side, centre crop,
ToTensor, Normalize), an eager ``model(x)`` under ``torch.no_grad()``, softmax, JSON.
Torch keeps its default thread count (every core per worker), as such services usually do;
``BASELINE_TORCH_THREADS=1`` gives the tuned variant (one thread per worker, no
oversubscription), which the benchmark also reports.

Run (what ``benchmarks/serve_load.py`` does)::

    BASELINE_WEIGHTS=/tmp/bench/model_state.pt BASELINE_ARCH=efficientnet_lite0 \\
    BASELINE_CLASSES=18 BASELINE_SIZE=224 \\
    python -m gunicorn -w 2 -b 127.0.0.1:8001 'benchmarks.flask_torch_baseline:create_app()'

Endpoints: ``POST /predict`` (multipart ``file`` or a raw image body), ``GET /health``.
"""

from __future__ import annotations

import io
import os
import time

from flask import Flask, jsonify, request


def create_app(weights: str | None = None, arch: str | None = None, num_classes: int | None = None,
               size: int | None = None) -> Flask:
    """Build the baseline app (arguments default to the ``BASELINE_*`` environment variables)."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from plantml.models import create_model

    weights = weights or os.environ["BASELINE_WEIGHTS"]
    arch = arch or os.environ.get("BASELINE_ARCH", "efficientnet_lite0")
    num_classes = num_classes or int(os.environ.get("BASELINE_CLASSES", "18"))
    size = size or int(os.environ.get("BASELINE_SIZE", "224"))

    if os.environ.get("BASELINE_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["BASELINE_TORCH_THREADS"]))
    model = create_model(arch, num_classes, pretrained=False, image_size=size)
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    # The flow's model.pt is a checkpoint dict (state_dict, arch, classes, ...); a bare state dict works too.
    model.load_state_dict(saved["state_dict"] if "state_dict" in saved else saved)
    model.eval()
    transform = transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    ])
    classes = [f"class_{i}" for i in range(num_classes)]
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.post("/predict")
    def predict():
        upload = request.files.get("file")
        data = upload.read() if upload is not None else request.get_data()
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - the baseline answers 400 like the product
            return jsonify({"error": str(exc)}), 400
        start = time.perf_counter()
        with torch.no_grad():
            probs = torch.softmax(model(transform(img).unsqueeze(0)), dim=1)[0]
        conf, idx = probs.max(0)
        return jsonify({
            "prediction": classes[int(idx)],
            "confidence": float(conf),
            "inference_time_ms": (time.perf_counter() - start) * 1000.0,
        })

    return app
