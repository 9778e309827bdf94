"""plantml: plant-leaf disease detection, from data to edge.

This package imports nothing heavy at import time: torch, mlflow, openvino, onnxruntime
and evidently are imported inside the functions that need them, so that the torch-free
parts (``config``, ``bundle``, ``preprocess``) stay light for serving and edge.
"""

__version__ = "0.1.0"
