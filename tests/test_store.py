"""The store: kept positions, dtypes, bytes on disk, no pickle, shards read by any process count."""

import math
import os
import stat

import numpy as np
import pytest
import torch

from hf_amnesia.layout import ParamLayout
from hf_amnesia.store import Manifest, ShardWriter, StoreReader, kept_positions, num_kept


def test_kept_positions_are_deterministic_sorted_and_distinct():
    a = kept_positions(3, 42, 10_000, 100)
    assert np.array_equal(a, kept_positions(3, 42, 10_000, 100))
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0) and a.max() < 10_000
    assert not np.array_equal(a, kept_positions(3, 43, 10_000, 100))
    assert not np.array_equal(a, kept_positions(4, 42, 10_000, 100))
    assert np.array_equal(kept_positions(0, 1, 50, 50), np.arange(50))


def test_num_kept_is_ceil():
    assert num_kept(0.01, 431_080) == math.ceil(4310.8)
    assert num_kept(1.0, 17) == 17 and num_kept(1e-9, 17) == 1


def _write(tmp_path, dtype, num_ids=300, num_params=40_000, keep_fraction=0.01, shards=1, epochs=2):
    layout = ParamLayout(("w",), ((num_params,),))
    manifest = Manifest(layout=layout, keep_fraction=keep_fraction, dtype=dtype, seed=1, num_shards=shards, decay=[1.0])
    manifest.save(tmp_path)
    k = manifest.k
    expected = {}
    rng = np.random.default_rng(0)
    for rank in range(shards):
        writer = ShardWriter(tmp_path, rank, k, dtype)
        for _ in range(epochs):
            ids = np.arange(rank, num_ids, shards)
            values = torch.from_numpy(rng.normal(size=(len(ids), k)).astype(np.float32))
            writer.append(ids, values)
            for i, v in zip(ids, values):
                expected[int(i)] = expected.get(int(i), 0) + v
        writer.compact()
        writer.close()
    return expected, k


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_rows_sum_epochs_and_round_trip(tmp_path, dtype, tol):
    expected, _ = _write(tmp_path, dtype)
    reader = StoreReader(tmp_path)
    for i, v in expected.items():
        got = reader.read(i)
        assert (got - v).abs().max() <= tol * (1 + v.abs().max())
    assert reader.read(10_000) is None


def test_bytes_on_disk_within_two_percent(tmp_path):
    expected, k = _write(tmp_path, "float16", num_ids=500, num_params=431_080)
    disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    ideal = len(expected) * k * 2
    assert abs(disk - ideal) / ideal <= 0.02, (disk, ideal)


def test_two_shards_are_read_by_one_process(tmp_path):
    expected, _ = _write(tmp_path, "float32", shards=2)
    reader = StoreReader(tmp_path)
    assert sorted(reader.all_ids().tolist()) == sorted(expected)
    assert all(torch.allclose(reader.read(i), v) for i, v in expected.items())


def test_files_are_private_and_unpicklable(tmp_path):
    _write(tmp_path, "float16", num_ids=10, num_params=1000)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    ids = np.load(tmp_path / "shard-00000.g000001.ids.npy", allow_pickle=False)
    assert ids.dtype == np.int64


def test_damaged_shard_is_detected(tmp_path):
    from hf_amnesia import StoreError

    _write(tmp_path, "float16", num_ids=10, num_params=1000)
    rows = tmp_path / "shard-00000.g000001.rows"
    with open(rows, "r+b") as f:  # flip one byte of row 3
        f.seek(3 * 10 * 2 + 1)
        byte = f.read(1)
        f.seek(3 * 10 * 2 + 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    reader = StoreReader(tmp_path)
    assert reader.read(0) is not None
    with pytest.raises(StoreError, match="checksum"):
        reader.read(3)
    with pytest.raises(StoreError, match="checksum"):
        reader.verify()
    with open(rows, "r+b") as f:
        f.truncate(rows.stat().st_size - 3)
    with pytest.raises(StoreError, match="truncated"):
        StoreReader(tmp_path)
    (tmp_path / "shard-00000.g000001.ids.npy").unlink()
    with pytest.raises(StoreError, match="missing"):
        StoreReader(tmp_path)
    (tmp_path / "shard-00000.json").unlink()
    with pytest.raises(StoreError, match="shard 0 is missing"):
        StoreReader(tmp_path)


def test_purge_erases_rows_in_place_and_keeps_other_checksums(tmp_path):
    """Purged rows become zeros on disk and leave the store; a row damaged before the purge still
    fails its checksum after it (a purge never re-blesses rows)."""
    from hf_amnesia import StoreError
    from hf_amnesia.store import purge_rows

    _write(tmp_path, "float16", num_ids=10, num_params=1000)
    rows = tmp_path / "shard-00000.g000001.rows"
    data = bytearray(rows.read_bytes())
    data[3 * 10 * 2] ^= 0xFF  # damage row of id 3
    rows.write_bytes(bytes(data))
    manifest = Manifest.load(tmp_path)
    purge_rows(tmp_path, manifest, np.array([0, 7]))
    purge_rows(tmp_path, manifest, np.array([0, 7]))  # idempotent
    raw = rows.read_bytes()
    assert raw[:20] == bytes(20) and raw[7 * 20 : 8 * 20] == bytes(20)
    reader = StoreReader(tmp_path)
    assert reader.read(0) is None and reader.read(7) is None and reader.read(5) is not None
    assert 0 not in reader.all_ids() and len(reader.all_ids()) == 8
    assert reader.recorded_count() == 10  # purged ids were still trained on: the training's rows count them
    with pytest.raises(StoreError, match="checksum"):
        reader.read(3)


def test_delta_sums_add_drain_and_refuse_unknown_ids():
    from hf_amnesia.errors import UnsupportedTrainingError
    from hf_amnesia.recorder import DeltaSums

    sums = DeltaSums(np.array([7, 3, 11, 5]), k=3, device="cpu", chunk_bytes=2 * 3 * 4)  # 2 rows a chunk
    sums.add(np.array([3, 11]), torch.ones(2, 3))
    sums.add(np.array([3, 3]), torch.full((2, 3), 0.5))  # an id twice in one call adds twice
    chunks = list((ids.copy(), values.clone()) for ids, values in sums.drain())
    assert [len(ids) for ids, _ in chunks] == [2]
    got = {int(i): v for ids, values in chunks for i, v in zip(ids, values)}
    assert torch.equal(got[3], torch.full((3,), 2.0)) and torch.equal(got[11], torch.ones(3))
    assert not sums.touched.any() and not sums.values.any()  # drained rows are zeroed
    sums.add(np.array([5, 7, 11]), torch.ones(3, 3))
    assert [len(ids) for ids, _ in sums.drain()] == [2, 1]  # chunks of at most 2 rows
    assert list(sums.drain()) == []  # nothing touched since
    with pytest.raises(UnsupportedTrainingError, match="train_dataset"):
        sums.check(np.array([5, 6]))
    with pytest.raises(UnsupportedTrainingError, match="train_dataset"):
        sums.check(np.array([12]))
