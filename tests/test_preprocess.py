import io

import numpy as np
import pytest
from PIL import Image

from plantml.preprocess import ImageDecodeError, InputSpec, decode_image, preprocess_image, resize_center_crop, softmax, top_k
from tests.conftest import jpeg_bytes, make_leaf_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_eval_transform_matches_training_time_tensor():
    """The training-time eval path (uint8 cache -> normalize_batch) equals preprocess_image."""
    from plantml.training import normalize_batch

    spec = InputSpec(size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = make_leaf_image((30, 140, 40), size=80, seed=3)
    cached = resize_center_crop(img, spec.size)[None]
    np.testing.assert_array_equal(normalize_batch(cached, spec)[0], preprocess_image(img, spec))


def test_preprocess_matches_torchvision_eval_transform():
    """Same tensor as the equivalent torchvision pipeline (Resize shorter side + CenterCrop + Normalize)."""
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T

    spec = InputSpec(size=64)
    img = make_leaf_image((120, 80, 30), size=64, seed=1)
    tv = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    np.testing.assert_allclose(tv(img).numpy(), preprocess_image(img, spec), atol=1e-6)
    del torch


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "LA"])
def test_unusual_modes_become_rgb(mode):
    base = make_leaf_image((40, 160, 40), size=40)
    img = base.convert(mode) if mode != "I;16" else Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 256))
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (40, 40)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 30), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (30, 60)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"definitely not an image", "not_image"),
])
def test_bad_bytes_have_reasons(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_truncated_jpeg_is_rejected():
    data = jpeg_bytes(make_leaf_image((40, 160, 40), size=128))
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason == "truncated"


def test_decompression_bomb_refused_before_decoding():
    big = Image.new("L", (9000, 9000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(buf.getvalue())
    assert err.value.reason == "too_large"


def test_extreme_aspect_ratio_is_center_cropped():
    img = Image.new("RGB", (400, 20), (0, 255, 0))
    assert resize_center_crop(img, 32).shape == (32, 32, 3)


def test_softmax_and_topk():
    p = softmax(np.array([[1.0, 3.0, 2.0]]), temperature=2.0)[0]
    assert abs(p.sum() - 1) < 1e-6 and p.argmax() == 1
    assert [t["label"] for t in top_k(p, ["a", "b", "c"], 2)] == ["b", "c"]
