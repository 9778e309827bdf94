import io

import numpy as np
import pytest
from PIL import Image

from plantml.preprocess import (ImageDecodeError, InputSpec, decode_image, preprocess_image, resize_center_crop,
                                softmax, top_k)
from tests.conftest import jpeg_bytes, make_leaf_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_eval_transform_matches_training_time_tensor():
    """The training-time eval path (uint8 cache -> normalize_batch) equals preprocess_image."""
    from plantml.preprocess import normalize_batch

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
    img = (base.convert(mode) if mode != "I;16"
           else Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 256)))
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


# --------------------------------------------------------------------------- issue 13: memory-safe decoding


def _two_step_reference(img: Image.Image, size: int) -> np.ndarray:
    """The rule as it was implemented before issue 13: resize the whole image, then crop."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


@pytest.mark.parametrize("width,height,size", [
    (256, 256, 224), (300, 200, 224), (200, 300, 160), (1600, 1200, 224), (640, 480, 224), (255, 256, 224),
    (33, 77, 160), (1000, 16, 32), (17, 1000, 64), (1, 1, 32), (1, 150, 32),
])
def test_box_resize_matches_the_two_step_rule(width, height, size):
    """One resize of the source-coordinate crop box gives the training-time pixels (within 1/255)."""
    rng = np.random.default_rng(width * 7 + height)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    new, old = resize_center_crop(img, size).astype(int), _two_step_reference(img, size).astype(int)
    assert new.shape == old.shape == (size, size, 3)
    assert np.abs(new - old).max() <= 1 and np.abs(new - old).mean() < 0.3


def test_a_long_strip_never_builds_the_scaled_image():
    """1 x 40,000,000 used to be scaled to 224 x 8.96e9 before cropping (OverflowError -> 500)."""
    strip = Image.new("L", (1, 40_000_000), 90)
    out = resize_center_crop(strip, 32)
    assert out.shape == (32, 32) and int(out.max()) == 90


def test_pixel_and_aspect_limits_are_checked_before_decoding():
    from tests.support.serving import png_bytes

    from plantml.preprocess import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS

    assert 12_000_000 <= MAX_IMAGE_PIXELS <= 16_000_000
    with pytest.raises(ImageDecodeError) as err:
        decode_image(png_bytes(4001, 4001))  # 16.008 MP
    assert err.value.reason == "too_large"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(png_bytes(1, 40_000_000, color_type=0))
    assert err.value.reason == "aspect_ratio" and "100:1" in str(err.value)
    assert decode_image(png_bytes(int(MAX_ASPECT_RATIO) * 3, 3)).size == (300, 3)


def _old_16bit_to_rgb(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.asarray(Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L").convert("RGB"))


def test_16_bit_images_are_scaled_without_float64_copies():
    import tracemalloc

    rng = np.random.default_rng(1)
    arr = (rng.integers(300, 60000, (2000, 2000))).astype(np.uint16)
    data = _png(Image.fromarray(arr))
    reference = _old_16bit_to_rgb(Image.open(io.BytesIO(data)))
    tracemalloc.start()
    try:
        out = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.abs(np.asarray(out).astype(int) - reference.astype(int)).max() <= 1
    # numpy allocations are traced: the old float64 path alone needed 8 bytes/pixel (32 MB here)
    assert peak < 20 * 1024 * 1024, peak / 1e6


def test_alpha_is_composited_on_white_as_before():
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(rng.integers(0, 256, (60, 80, 4), dtype=np.uint8), mode="RGBA")
    reference = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    for img in (rgba, rgba.convert("LA")):
        expected = reference if img.mode == "RGBA" else Image.alpha_composite(
            Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA")).convert("RGB")
        diff = np.abs(np.asarray(decode_image(_png(img))).astype(int) - np.asarray(expected).astype(int))
        assert diff.max() <= 1, img.mode


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_model_input():
    photo = make_leaf_image((120, 80, 30), size=96, seed=5).resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=92)
    decoded = decode_image(buf.getvalue())
    assert decoded.size == (1000, 750)  # 1/4 scale: the shorter side stays >= DRAFT_MIN_SIDE
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # no draft
    diff = np.abs(resize_center_crop(decoded, 224).astype(int) - resize_center_crop(full, 224).astype(int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8


def test_only_accepted_formats_are_decoded():
    buf = io.BytesIO()
    make_leaf_image((40, 160, 40), size=32).save(buf, format="PPM")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(buf.getvalue())
    assert err.value.reason == "not_image" and "accepted: JPEG" in str(err.value)
