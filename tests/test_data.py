import shutil

import pytest

from plantml.data import DataError, assign_splits, detect_layout, prepare_dataset, read_manifest, save_prepared
from plantml.demo_data import DEMO_CLASSES, ensure_demo_dataset
from tests.conftest import TINY_CLASSES, make_leaf_image


def test_split_is_stratified_deterministic_and_complete(tiny_dataset):
    rows, summary = prepare_dataset(tiny_dataset, (0.7, 0.2, 0.1), seed=1, progress=False)
    again, _ = prepare_dataset(tiny_dataset, (0.7, 0.2, 0.1), seed=1, progress=False)
    assert rows == again
    assert summary.classes == sorted(TINY_CLASSES)
    for counts in summary.counts.values():
        assert counts == {"train": 14, "val": 4, "test": 2}
    other, _ = prepare_dataset(tiny_dataset, (0.7, 0.2, 0.1), seed=2, progress=False)
    assert {r.path: r.split for r in other} != {r.path: r.split for r in rows}


def test_duplicates_never_straddle_splits(tmp_path):
    for k, c in enumerate(("A", "B")):
        (tmp_path / c).mkdir()
        for i in range(10):
            make_leaf_image((10 * i, 100, 50 + k), seed=100 * k + i).save(tmp_path / c / f"{i}.png")
        for i in range(10):  # exact copies of each file
            shutil.copy(tmp_path / c / f"{i}.png", tmp_path / c / f"{i}_copy.png")
    rows, summary = prepare_dataset(tmp_path, seed=0, progress=False)
    by_hash = {}
    for r in rows:
        by_hash.setdefault(r.sha256, set()).add(r.split)
    assert all(len(s) == 1 for s in by_hash.values())
    assert summary.n_duplicate_files == 20


def test_corrupt_and_non_image_files_are_skipped_and_counted(tiny_dataset, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_dataset, root)
    cls = sorted(TINY_CLASSES)[0]
    (root / cls / "notes.txt").write_text("hello")
    (root / cls / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    data = (tiny_dataset / cls / "img_000.jpg").read_bytes()
    (root / cls / "truncated.jpg").write_bytes(data[: len(data) // 3])
    rows, summary = prepare_dataset(root, progress=False)
    assert summary.n_skipped == 3
    assert {s["path"].rsplit("/", 1)[-1] for s in summary.skipped} == {"notes.txt", "broken.jpg", "truncated.jpg"}
    assert summary.n_images == 60


def test_missing_dir_one_class_and_empty_class(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        prepare_dataset(tmp_path / "nope", progress=False)
    (tmp_path / "Only").mkdir()
    for i in range(5):
        make_leaf_image((1, 2, 3), seed=i).save(tmp_path / "Only" / f"{i}.png")
    (tmp_path / "Empty").mkdir()
    with pytest.raises(DataError, match=r"found 1 usable class folder .*need at least 2.*empty: Empty"):
        prepare_dataset(tmp_path, progress=False)


def test_empty_class_folder_is_skipped_when_others_remain(tiny_dataset, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_dataset, root)
    (root / "Empty___class").mkdir()
    _, summary = prepare_dataset(root, progress=False)
    assert summary.skipped_empty_classes == ["Empty___class"]
    assert "Empty___class" not in summary.classes


def test_layout_variants(tmp_path):
    for variant in ("color", "presplit"):
        root = tmp_path / variant
        folders = {"color": ["color"], "presplit": ["train", "valid"]}[variant]
        for f in folders:
            for c in ("A", "B"):
                (root / f / c).mkdir(parents=True)
                for i in range(6):
                    # A distinct seed per image: hash() of strings changes per process, and two
                    # equal images would be (rightly) de-duplicated into the same split.
                    seed = 1000 * folders.index(f) + 100 * ("AB".index(c)) + i
                    make_leaf_image((50 + 10 * i, 100 if c == "A" else 20, 9), seed=seed).save(
                        root / f / c / f"{f}{i}.png")
        if variant == "color":
            (root / "grayscale" / "A").mkdir(parents=True)
        layout, _ = detect_layout(root)
        assert layout == variant
        rows, summary = prepare_dataset(root, progress=False)
        assert summary.classes == ["A", "B"]
        if variant == "presplit":
            assert all(r.split == "train" for r in rows if r.path.startswith("train/"))
            assert {r.split for r in rows if r.path.startswith("valid/")} == {"val", "test"}


def test_manifest_roundtrip(tiny_dataset, tmp_path):
    rows, summary = prepare_dataset(tiny_dataset, progress=False)
    path = save_prepared(rows, summary, tmp_path)
    assert read_manifest(path) == rows
    assert (tmp_path / "summary.json").is_file()


def test_demo_dataset_is_labelled_and_deterministic(tmp_path):
    a = ensure_demo_dataset(tmp_path / "a", n_classes=3, per_class=10, size=64, seed=0)
    b = ensure_demo_dataset(tmp_path / "b", n_classes=3, per_class=10, size=64, seed=0)
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == sorted(DEMO_CLASSES[:3])
    assert all(c.startswith("DEMO_") for c in DEMO_CLASSES)
    assert (a / DEMO_CLASSES[0] / "demo_0003.jpg").read_bytes() == (b / DEMO_CLASSES[0] / "demo_0003.jpg").read_bytes()
    assert "SYNTHETIC" in (a / "README.txt").read_text()


def test_assign_splits_keeps_presplit_train():
    items = [{"path": f"/x/{i}", "label": "A" if i % 2 else "B", "source": "train", "sha256": str(i), "width": 1,
              "height": 1} for i in range(10)]
    assert {r.split for r in assign_splits(items, (0.7, 0.2, 0.1), 0)} == {"train"}
