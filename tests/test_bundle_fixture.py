from plantml.bundle import load_bundle


def test_tiny_bundle_loads(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.available() == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert b.metadata["parity"]["max_abs_diff"]["onnxruntime_fp32"]["max"] < 1e-4


# --------------------------------------------------------------------------- issue 13: containment and pinning

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from plantml.bundle import BundleError, sha256_file  # noqa: E402


def _copy_with_file_path(tiny_bundle, tmp_path, new_path: str, target=None):
    """A copy of the bundle whose ONNX entry points at ``new_path`` (with that file's real hash)."""
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    meta = json.loads((root / "metadata.json").read_text())
    entry = next(f for f in meta["files"] if f["path"] == "model.onnx")
    entry["path"] = new_path
    if target is not None:
        entry["sha256"] = sha256_file(target)
    (root / "metadata.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "etc_hostname"])
def test_bundle_paths_must_stay_inside_the_bundle(tiny_bundle, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_bundle / "model.onnx", outside / "model.onnx")
    if kind == "parent":
        root = _copy_with_file_path(tiny_bundle, tmp_path, "../outside/model.onnx", outside / "model.onnx")
    elif kind == "absolute":
        root = _copy_with_file_path(tiny_bundle, tmp_path, str(outside / "model.onnx"), outside / "model.onnx")
    elif kind == "symlink":
        root = _copy_with_file_path(tiny_bundle, tmp_path, "linked.onnx", outside / "model.onnx")
        (root / "linked.onnx").symlink_to(outside / "model.onnx")
    else:
        root = _copy_with_file_path(tiny_bundle, tmp_path, "../../../../../../../../etc/hostname",
                                    "/etc/hostname")
    for verify in (True, False):
        with pytest.raises(BundleError, match="absolute|leaves the bundle|symbolic link|outside"):
            load_bundle(root, verify=verify)


def test_metadata_digest_can_be_pinned(tiny_bundle, tmp_path):
    digest = hashlib.sha256((tiny_bundle / "metadata.json").read_bytes()).hexdigest()
    assert load_bundle(tiny_bundle, expected_metadata_sha256=digest).name == "tiny-test-model"
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    meta = json.loads((root / "metadata.json").read_text())
    meta["calibration"]["abstain_threshold"] = 0.0001  # a tampered registry copy, consistent in itself
    (root / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="PLANTML_BUNDLE_SHA256"):
        load_bundle(root, expected_metadata_sha256=digest)


def test_read_verified_hashes_the_bytes_it_returns(tiny_bundle, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    b = load_bundle(root, verify=False)
    assert b.read_verified("model.onnx") == (root / "model.onnx").read_bytes()
    with open(root / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch for model.onnx"):
        b.read_verified("model.onnx")
    with pytest.raises(BundleError, match="not listed"):
        b.read_verified("metadata.json")
