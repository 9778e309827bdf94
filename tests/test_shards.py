"""Streaming data: shards written once, read back exactly, split across ranks and workers."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest

from plantml import shards as sh
from plantml.loader import plan_slot, samples_for_rank, steps_per_epoch
from plantml.preprocess import load_image, resize_center_crop
from plantml.resources import available_cores, cgroup_cpu_limit, resolve_loader_workers
from tests.conftest import make_shards


def test_every_image_is_in_exactly_one_shard_with_its_decoded_pixels(tiny_dataset, tiny_shards):
    rows, summary, index = tiny_shards
    seen = Counter()
    for split in ("train", "val", "test"):
        for s in sh.iter_split(index, split, with_originals=True):
            seen[s.key] += 1
            row = next(r for r in rows if r.key == s.key)
            assert row.split == split and summary.classes[s.label] == row.label == s.meta["label"]
            # Decoded once in prepare: the stored pixels are the eval transform of the file.
            np.testing.assert_array_equal(s.pixels, resize_center_crop(load_image(tiny_dataset / row.path), 32))
            if split == "train":
                assert s.original is None  # originals only where the drift reference / sweeps need them
            else:
                assert s.original == (tiny_dataset / row.path).read_bytes()
    assert set(seen) == {r.key for r in rows} and set(seen.values()) == {1}
    assert {s: index.count(s) for s in index.splits} == dict(Counter(r.split for r in rows))


def test_train_shards_are_stored_shuffled_and_index_is_complete(tiny_shards):
    _, _, index = tiny_shards
    labels = [s.label for s in sh.iter_split(index, "train")]
    assert len(set(labels[:8])) > 1  # not class by class: a shuffle buffer mixes from the start
    raw = json.loads(sh.storage.read_bytes(sh.storage.join(index.root, sh.INDEX_FILE)))
    assert raw["format"] == "webdataset" and raw["image_size"] == 32
    assert sum(raw["splits"]["train"]["counts"]) == index.count("train") == raw["splits"]["train"]["n"]


def test_shards_are_standard_webdataset(tiny_shards):
    wds = pytest.importorskip("webdataset")
    _, summary, index = tiny_shards
    samples = list(wds.WebDataset(index.shard_uris("val"), shardshuffle=False).decode())
    assert len(samples) == index.count("val")
    first = samples[0]
    assert first["npy"].shape == (32, 32, 3) and first["npy"].dtype == np.uint8
    assert summary.classes[int(first["cls"])] == first["json"]["label"]


@pytest.mark.parametrize("n_shards", [1, 3, 7, 16])
@pytest.mark.parametrize("n_slots", [1, 2, 4, 6])
def test_slots_cover_every_sample_once(n_shards, n_slots):
    counts = [5 + (i % 3) for i in range(n_shards)]
    positions = [(j, p) for j, c in enumerate(counts) for p in range(c)]
    taken: list[tuple[int, int]] = []
    for slot in range(n_slots):
        plan = plan_slot(n_shards, slot, n_slots, shuffle=True, seed=1, epoch=2)
        pos = 0
        for j in plan.shard_ids:
            for p in range(counts[j]):
                if pos % plan.stride == plan.offset:
                    taken.append((j, p))
                pos += 1
    assert sorted(taken) == sorted(positions)


def test_ranks_take_equal_steps():
    counts = [100, 100, 37, 100, 12]
    for world in (2, 3, 8):
        per_rank = [samples_for_rank(counts, r, world, True, 0, 1) for r in range(world)]
        assert sum(per_rank) == sum(counts)
        steps = steps_per_epoch(counts, 16, world, True, 0, 1)
        assert steps == min(n // 16 for n in per_rank)  # every rank can take them, none more
    assert steps_per_epoch([34], 16) == 3   # a lone process keeps a last batch of >= 2 ...
    assert steps_per_epoch([33], 16) == 2   # ... but not of one (BatchNorm)


def test_loader_with_worker_processes_streams_the_whole_split(tiny_shards):
    pytest.importorskip("torch")
    from plantml.data import augmentation_factory
    from plantml.loader import make_loader

    _, _, index = tiny_shards
    seen = []
    for images, labels, keys in make_loader(index, "train", 8, train=True, workers=2, with_key=True,
                                            augment_factory=augmentation_factory(32), seed=3, epoch=1):
        assert images.dtype.is_floating_point is False and images.shape[1:] == (32, 32, 3)
        seen += keys
    assert sorted(seen) == sorted(s.key for s in sh.iter_split(index, "train"))
    for rank in range(2):  # two data-parallel ranks, in-process: disjoint halves
        keys = [k for *_, ks in make_loader(index, "train", 8, train=True, rank=rank, world=2, with_key=True)
                for k in ks]
        assert len(keys) == samples_for_rank(index.splits["train"].counts, rank, 2, True, 0, 0)


def test_prepare_reads_an_s3_prefix_and_writes_shards_to_s3(tiny_dataset, tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    pytest.importorskip("torch")
    import boto3

    from plantml import storage
    from plantml.loader import make_loader

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "METAFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    storage._client.cache_clear()
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="leaves")
        for f in sorted(tiny_dataset.rglob("*.jpg")):
            s3.upload_file(str(f), "leaves", f"raw/{f.relative_to(tiny_dataset).as_posix()}")
        rows_s3, summary_s3, index_s3 = make_shards("s3://leaves/raw", "s3://leaves/run/data")
        rows_local, _, _ = make_shards(tiny_dataset, tmp_path / "local")
        assert summary_s3.root == "s3://leaves/raw"
        assert [(r.path, r.split, r.sha256) for r in rows_s3] == [(r.path, r.split, r.sha256) for r in rows_local]
        index = sh.load_index("s3://leaves/run/data")
        assert index.count("test") == index_s3.count("test")
        n = sum(len(y) for _, y in make_loader(index, "val", 8))
        assert n == index.count("val")
        with pytest.raises(Exception, match="data directory not found: no files under s3://leaves/nothing"):
            make_shards("s3://leaves/nothing", "s3://leaves/x")
    storage._client.cache_clear()


def test_missing_shards_say_run_prepare(tmp_path):
    with pytest.raises(sh.storage.StorageError, match="no prepared shards at .*run the prepare step first"):
        sh.load_index(tmp_path / "nothing")


def test_cpu_quota_from_cgroup_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5
    assert available_cores(v2) == min(2, available_cores())
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(v1) == 1.0 and available_cores(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(v1) is None


def test_loader_workers_follow_the_device_and_quota():
    assert resolve_loader_workers(3, 16, "cpu") == 3
    assert resolve_loader_workers(-1, 1, "cpu") == 0
    assert resolve_loader_workers(-1, 8, "cpu") == 2
    assert resolve_loader_workers(-1, 16, "cuda") == 8
    assert resolve_loader_workers(-1, 2, "cuda") == 1


def test_npy_payload_is_plain_numpy(tiny_shards):
    _, _, index = tiny_shards
    first = next(sh.iter_split(index, "test"))
    buf = io.BytesIO()
    np.save(buf, first.pixels)
    assert np.load(io.BytesIO(buf.getvalue())).shape == (32, 32, 3)
