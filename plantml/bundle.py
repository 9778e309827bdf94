"""The model bundle: the only thing serving and edge read. Torch-free.

A bundle is a directory::

    <name>-<version>/
        metadata.json          # schema below
        model.onnx             # ONNX FP32
        model.int8.onnx        # ONNX Runtime static QDQ INT8 (if it passed the accuracy gate)
        openvino/model.xml|bin # OpenVINO IR FP32
        openvino_int8/...      # OpenVINO NNCF INT8 (if it passed the gate)
        reference_stats.parquet / .csv  # drift reference (optional)
        student/               # the edge student (optional): a bundle of its own, see below

``metadata.json`` keys: ``schema_version``, ``name``, ``version``, ``architecture``,
``classes`` (ordered as the model's outputs), ``input`` (:class:`InputSpec`), ``files``
(list of ``{path, format, runtime, precision, role, sha256, bytes}``), ``metrics``
(``{"fp32": {...}, "int8_openvino": {...}, ...}``), ``calibration`` (``temperature``,
``abstain_threshold``, and ``ood_threshold`` when the model has an ``ood_score`` output),
``outputs`` (the model's output names, ``["logits"]`` or ``["logits", "ood_score"]``),
``lineage`` (``metaflow_run_id``, ``mlflow_run_id``,
``data_manifest_sha256``, ``git_commit``, ``created_at``) and ``params``.

Bundles are written atomically by :class:`BundleWriter` (a hidden temporary directory
renamed into place), and :func:`load_bundle` verifies every file's sha256.

An optional edge student (:mod:`plantml.pipeline.student_export`) is a bundle of its own in
``student/``; the top-level ``files`` list holds only the champion's, and the ``student``
block (kept or not, why) pins ``student/metadata.json`` by sha256 (:func:`load_student_bundle`).

A bundle may come from a registry that others can write to, so loading trusts nothing
in it: every listed path must be relative, free of ``..`` and of symbolic links, and
resolve inside the bundle directory; ``metadata.json`` itself can be pinned by digest
(``expected_metadata_sha256``, the service's ``PLANTML_BUNDLE_SHA256``). A consumer that
loads a model file should take its bytes from :meth:`Bundle.read_verified`, which hashes
exactly the bytes it returns, so nothing can change the file between check and use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from plantml.preprocess import InputSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"
#: The edge student's sub-bundle folder.
STUDENT_DIR = "student"
REQUIRED_KEYS = (
    "schema_version", "name", "version", "architecture", "classes", "input", "files",
    "metrics", "calibration", "lineage",
)


class BundleError(ValueError):
    """A bundle is missing, malformed or fails its integrity check."""


def contained_path(root: Path, rel: str) -> Path:
    """``root / rel`` after checking that ``rel`` cannot leave the bundle.

    Args:
        root: the bundle directory, already resolved.
        rel: a path as written in ``metadata.json``.

    Raises:
        BundleError: absolute path, a ``..`` component, a symbolic link on the way, or a
            path that resolves outside ``root``.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BundleError(f"bundle file path {rel!r} is not a non-empty string")
    pure = Path(rel)
    if pure.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise BundleError(f"bundle file path {rel!r} is absolute; paths must be relative to the bundle")
    if any(part == ".." for part in pure.parts) or "\\" in rel:
        raise BundleError(f"bundle file path {rel!r} leaves the bundle directory")
    path = root
    for part in pure.parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"bundle file path {rel!r} goes through a symbolic link ({path.name})")
    try:
        path.resolve().relative_to(root)
    except ValueError:
        raise BundleError(f"bundle file path {rel!r} resolves outside the bundle directory") from None
    return path


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, rel_path: str, *, fmt: str, runtime: str, precision: str, role: str = "model") -> dict:
    """Describe one bundle file (hash and size computed now)."""
    path = root / rel_path
    return {
        "path": rel_path,
        "format": fmt,
        "runtime": runtime,
        "precision": precision,
        "role": role,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle."""

    root: Path
    metadata: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.metadata["input"])

    @property
    def temperature(self) -> float:
        return float(self.metadata.get("calibration", {}).get("temperature", 1.0))

    @property
    def abstain_threshold(self) -> float:
        return float(self.metadata.get("calibration", {}).get("abstain_threshold", 0.0))

    @property
    def ood_threshold(self) -> float | None:
        """Largest ``ood_score`` still answered (``calibration.ood_threshold``), or ``None``
        for a bundle whose model has no OOD output (then only the confidence rule applies)."""
        value = self.metadata.get("calibration", {}).get("ood_threshold")
        return None if value is None else float(value)

    @property
    def outputs(self) -> list[str]:
        """Names of the model's outputs (``["logits"]`` or ``["logits", "ood_score"]``)."""
        return list(self.metadata.get("outputs", ["logits"]))

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    def available(self) -> list[tuple[str, str]]:
        """``(runtime, precision)`` pairs that have a model file."""
        return [(f["runtime"], f["precision"]) for f in self.metadata["files"] if f.get("role", "model") == "model"]

    def model_path(self, runtime: str, precision: str = "fp32") -> Path:
        """Path of the model file for a runtime and precision.

        Raises:
            BundleError: if the bundle has no such model.
        """
        for f in self.metadata["files"]:
            if f["runtime"] == runtime and f["precision"] == precision and f.get("role", "model") == "model":
                return contained_path(self.root, f["path"])
        have = ", ".join(f"{r}/{p}" for r, p in self.available()) or "none"
        raise BundleError(f"bundle {self.root} has no {runtime} {precision} model (available: {have})")

    def model_files(self, runtime: str, precision: str = "fp32") -> list[dict[str, Any]]:
        """The ``files`` entries of one runtime/precision: the model first, then its weights etc."""
        entries = [f for f in self.metadata["files"] if f["runtime"] == runtime and f["precision"] == precision]
        return sorted(entries, key=lambda f: f.get("role", "model") != "model")

    def path(self, rel: str) -> Path:
        return contained_path(self.root, rel)

    def read_verified(self, rel: str) -> bytes:
        """The bytes of a listed file, checked against its sha256 (the bytes returned are the bytes hashed).

        Raises:
            BundleError: the file is not listed, cannot be read, or does not match its hash.
        """
        entry = next((f for f in self.metadata["files"] if f["path"] == rel), None)
        if entry is None:
            raise BundleError(f"{rel!r} is not listed in the bundle's {METADATA_FILE}")
        path = contained_path(self.root, rel)
        try:
            with open(path, "rb", opener=_no_follow_opener) as fh:
                data = fh.read()
        except OSError as exc:
            raise BundleError(f"bundle file {rel} cannot be read: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry["sha256"]:
            raise BundleError(
                f"sha256 mismatch for {rel}: metadata says {entry['sha256'][:12]}..., file is {actual[:12]}... "
                "(the bundle was modified or corrupted; refusing to load it)"
            )
        return data


def _no_follow_opener(path: str, flags: int) -> int:
    """``open`` that refuses a symbolic link as the last component (O_NOFOLLOW)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def validate_metadata(meta: Mapping[str, Any], where: str = "metadata.json") -> None:
    """Check the required keys and basic types; raise :class:`BundleError` naming the problem."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{where} is missing required key(s): {', '.join(missing)}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise BundleError(f"{where} has schema_version {meta['schema_version']}, this code reads {SCHEMA_VERSION}")
    if not isinstance(meta["classes"], list) or len(meta["classes"]) < 2:
        raise BundleError(f"{where}: classes must be a list of at least 2 names")
    if not isinstance(meta["files"], list) or not meta["files"]:
        raise BundleError(f"{where}: files must be a non-empty list")
    for f in meta["files"]:
        for key in ("path", "format", "runtime", "precision", "sha256"):
            if key not in f:
                raise BundleError(f"{where}: a files entry lacks {key!r}: {f}")
    ood = meta["calibration"].get("ood_threshold") if isinstance(meta["calibration"], Mapping) else None
    if ood is not None:
        if not isinstance(ood, (int, float)) or not ood > 0:
            raise BundleError(f"{where}: calibration.ood_threshold must be a positive number, got {ood!r}")
        if "ood_score" not in meta.get("outputs", []):
            raise BundleError(f"{where}: calibration.ood_threshold is set but the model has no 'ood_score' output")
    try:
        InputSpec.from_dict(meta["input"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: bad input spec: {exc}") from exc


def load_bundle(root: str | os.PathLike[str], verify: bool = True,
                expected_metadata_sha256: str | None = None) -> Bundle:
    """Load a bundle directory and (by default) verify every file's sha256.

    Every listed path is checked to stay inside the bundle (:func:`contained_path`), with
    or without ``verify``.

    Args:
        root: the bundle directory (or a ``latest`` symlink to one).
        verify: check hashes; a mismatch is refused.
        expected_metadata_sha256: if given, the sha256 that ``metadata.json`` must have
            (a digest pinned in the deployment, so a tampered registry copy is refused).

    Raises:
        BundleError: missing directory/metadata, bad schema, a path leaving the bundle,
            missing file, hash mismatch.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    root = root.resolve()
    meta_path = root / METADATA_FILE
    if meta_path.is_symlink() or not meta_path.is_file():
        raise BundleError(f"not a bundle (no {METADATA_FILE} file): {root}")
    raw = meta_path.read_bytes()
    if expected_metadata_sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected_metadata_sha256.strip().lower():
            raise BundleError(
                f"{METADATA_FILE} has sha256 {actual[:12]}..., the pinned digest is "
                f"{expected_metadata_sha256[:12]}... (PLANTML_BUNDLE_SHA256): refusing a bundle that is not the "
                "one the deployment names"
            )
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} must hold a JSON object")
    validate_metadata(meta, str(meta_path))
    for f in meta["files"]:
        contained_path(root, f["path"])
    bundle = Bundle(root=root, metadata=meta)
    if verify:
        verify_files(bundle)
    return bundle


def student_block(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``student`` block of a bundle's ``metadata.json`` when it ships a student (``kept``), else ``None``."""
    block = load_bundle(root, verify=False).metadata.get("student")
    return dict(block) if isinstance(block, Mapping) and block.get("kept") else None


def load_student_bundle(root: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """The edge student of the bundle at ``root``, loaded through the sha256 its parent pins.

    Raises:
        BundleError: no student (the message carries the recorded reason), a digest mismatch, a bad file.
    """
    parent = load_bundle(root, verify=False)
    block = parent.metadata.get("student")
    if not isinstance(block, Mapping) or not block.get("kept"):
        why = block.get("reason") if isinstance(block, Mapping) else "it was exported without one"
        raise BundleError(f"bundle {parent.root} has no edge student ({why}); use --model champion")
    sub = contained_path(parent.root, str(block.get("path") or STUDENT_DIR))
    return load_bundle(sub, verify=verify, expected_metadata_sha256=str(block.get("metadata_sha256") or ""))


def verify_files(bundle: Bundle, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Check every listed file but those in ``skip`` (e.g. the ones read with :meth:`Bundle.read_verified`).

    Raises:
        BundleError: a path leaves the bundle, a file is missing, or a hash does not match.
    """
    for f in bundle.metadata["files"]:
        if f["path"] in skip:
            continue
        path = contained_path(bundle.root, f["path"])
        if not path.is_file():
            raise BundleError(f"bundle file missing: {f['path']} (listed in {bundle.root / METADATA_FILE})")
        actual = sha256_file(path)
        if actual != f["sha256"]:
            raise BundleError(
                f"sha256 mismatch for {f['path']}: metadata says {f['sha256'][:12]}..., file is {actual[:12]}... "
                "(the bundle was modified or corrupted; refusing to load it)"
            )


class BundleWriter:
    """Write a bundle atomically.

    Files are written into a hidden temporary directory beside the destination; on
    :meth:`commit` the metadata (with sha256 of every listed file) is written and the
    directory renamed into place. If the ``with`` block raises, the temporary directory
    is removed, so no half-written bundle is ever visible.

    Example::

        with BundleWriter(out_root, "plantml-leaf", version) as w:
            export_onnx(model, w.dir / "model.onnx")
            w.add_file("model.onnx", fmt="onnx", runtime="onnxruntime", precision="fp32")
            final_path = w.commit(metadata)
    """

    def __init__(self, out_root: str | os.PathLike[str], name: str, version: str) -> None:
        self.out_root = Path(out_root)
        self.final_dir = self.out_root / f"{name}-{version}"
        self.dir = self.out_root / f".tmp-{name}-{version}-{uuid.uuid4().hex[:8]}"
        self.files: list[dict[str, Any]] = []
        self._committed = False

    def __enter__(self) -> "BundleWriter":
        if self.final_dir.exists():
            raise BundleError(f"bundle already exists: {self.final_dir}")
        self.dir.mkdir(parents=True)
        return self

    def add_file(self, rel_path: str, *, fmt: str, runtime: str, precision: str, role: str = "model") -> dict:
        """Register a file already written under :attr:`dir`."""
        entry = file_entry(self.dir, rel_path, fmt=fmt, runtime=runtime, precision=precision, role=role)
        self.files = [f for f in self.files if f["path"] != rel_path] + [entry]
        return entry

    def remove_file(self, rel_path: str) -> None:
        """Drop a registered file (e.g. an INT8 model that failed its gate) and delete it."""
        self.files = [f for f in self.files if f["path"] != rel_path]
        target = self.dir / rel_path
        if target.is_file():
            target.unlink()

    def commit(self, metadata: Mapping[str, Any]) -> Path:
        """Write ``metadata.json`` and move the bundle into place; returns its final path."""
        meta = dict(metadata)
        meta["files"] = list(self.files)
        meta.setdefault("schema_version", SCHEMA_VERSION)
        validate_metadata(meta, "bundle metadata")
        tmp_meta = self.dir / (METADATA_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=False))
        os.replace(tmp_meta, self.dir / METADATA_FILE)
        os.replace(self.dir, self.final_dir)
        self._committed = True
        _point_latest(self.out_root, self.final_dir.name)
        log.info("bundle written: %s", self.final_dir)
        return self.final_dir

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def _point_latest(out_root: Path, target_name: str) -> None:
    """Atomically repoint ``<out_root>/latest`` at the newest bundle."""
    link = out_root / "latest"
    tmp = out_root / f".latest-{uuid.uuid4().hex[:8]}"
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
