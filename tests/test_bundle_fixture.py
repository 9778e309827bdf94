from plantml.bundle import load_bundle


def test_tiny_bundle_loads(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.available() == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert b.metadata["parity"]["max_abs_diff"]["onnxruntime_fp32"]["max"] < 1e-4
