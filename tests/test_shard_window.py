"""Reading S3 shards whole through the node's shard cache, and the shard-windowed epoch order that
makes training read them that way (docs/data.md, "How stages read")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unsupft import store
from unsupft.data import open_samples
from unsupft.data.samples import Fitted, Mixture, batches_of
from unsupft.data.shardcache import FETCH_AFTER_READS, shard_cache
from unsupft.errors import UserError
from unsupft.train.batches import ShardWindows, Shuffled


def windows_of(n_shards: int = 10, per_shard: int = 30, window: int = 3) -> ShardWindows:
    shard_of = torch.arange(n_shards).repeat_interleave(per_shard)
    return ShardWindows(Shuffled(len(shard_of), 7), shard_of, torch.full((n_shards,), 100), window * 100, seed=7)


def test_windowed_order_is_a_seeded_permutation_that_reads_a_window_of_shards_at_a_time() -> None:
    order = windows_of()
    epochs = [order(e) for e in range(3)]
    for indices in epochs:
        assert sorted(indices.tolist()) == list(range(300))
    assert torch.equal(epochs[0], windows_of()(0))  # a pure function of (seed, epoch): resume replays it
    assert not torch.equal(epochs[0], epochs[1])
    for indices in epochs:
        shards = (indices // 30).tolist()
        # 3 shards of 100 bytes per 300-byte window: each run of 90 positions covers exactly 3 whole shards
        windows = [set(shards[start:start + 90]) for start in range(0, 270, 90)]
        assert all(len(w) == 3 for w in windows) and len(set().union(*windows)) == 9
        assert set(shards[270:]) == set(range(10)) - set().union(*windows)
        assert shards[:90] != sorted(shards[:90])  # shuffled within the window, not shard by shard
    first_window = [set((indices[:90] // 30).tolist()) for indices in epochs]
    assert first_window[0] != first_window[1]  # the shard order and the windows are drawn per epoch


def test_a_data_set_within_one_window_keeps_the_full_shuffle() -> None:
    base = Shuffled(300, 7)
    order = ShardWindows(base, torch.arange(10).repeat_interleave(30), torch.full((10,), 100), 1000, seed=7)
    assert not order.windowed and torch.equal(order(4), base(4))


@pytest.fixture
def digits_on_s3(tmp_path: Path, s3_uri: str, ingest, monkeypatch) -> tuple[Path, str]:
    monkeypatch.setenv("UNSUPFT_CACHE", str(tmp_path / "cache"))
    ingest("sklearn:digits", tmp_path / "digits", "--limit", "400", "--shard-size", "100")
    store.copy_prefix(str(tmp_path / "digits"), f"{s3_uri}/digits")
    return tmp_path / "digits", f"{s3_uri}/digits"


def cached_shards(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "shards").glob("*.tar"))


def test_a_pass_over_s3_fetches_each_shard_once_and_reads_what_the_local_copy_holds(digits_on_s3, tmp_path) -> None:
    local, s3 = digits_on_s3
    expected = torch.cat(list(batches_of(Fitted(open_samples(str(local)), (8, 8)), 64, 0)))
    cache = shard_cache()
    got = torch.cat(list(batches_of(Fitted(open_samples(s3), (8, 8)), 64, 0)))
    assert torch.equal(got, expected)
    assert cache.fetched == 4 and len(cached_shards(tmp_path)) == 4
    # two DataLoader workers (other processes) find the shards on the node's disk: nothing fetched again
    before = {p: p.stat().st_ino for p in cached_shards(tmp_path)}
    assert torch.equal(torch.cat(list(batches_of(Fitted(open_samples(s3), (8, 8)), 64, 2))), expected)
    assert {p: p.stat().st_ino for p in cached_shards(tmp_path)} == before


def test_lock_files_stay_bounded_however_many_shards_pass(digits_on_s3, tmp_path, monkeypatch) -> None:
    import unsupft.data.shardcache as shardcache

    monkeypatch.setattr(shardcache, "LOCK_STRIPES", 2)
    samples = open_samples(digits_on_s3[1])
    for i in range(len(samples)):
        samples.encoded(i)
    assert shard_cache().fetched == 4 and len(cached_shards(tmp_path)) == 4
    assert len(list((tmp_path / "cache" / "shards").glob("*.lock"))) <= 2


def test_sparse_reads_stay_ranged_gets(digits_on_s3, tmp_path) -> None:
    samples = open_samples(digits_on_s3[1])
    for shard in range(4):
        for i in range(FETCH_AFTER_READS):
            samples.encoded(shard * 100 + i)
    assert shard_cache().fetched == 0 and cached_shards(tmp_path) == []
    samples.encoded(FETCH_AFTER_READS)
    assert shard_cache().fetched == 1


def test_the_cache_stays_within_its_budget(digits_on_s3, tmp_path, monkeypatch) -> None:
    local, s3 = digits_on_s3
    shard_size = max(p.stat().st_size for p in local.glob("*.tar"))
    monkeypatch.setenv("UNSUPFT_SHARD_CACHE_MB", str(2.5 * shard_size / 2**20))
    samples = open_samples(s3)
    for _ in range(2):
        for i in range(len(samples)):
            samples.encoded(i)
            on_disk = sum(p.stat().st_size for p in cached_shards(tmp_path))
            assert on_disk <= 2.5 * shard_size
    cache = shard_cache()
    assert cache.fetched == 8  # 4 shards per pass, the first ones evicted by the time the pass ends
    assert len(cache._held) == 1  # descriptors held: at most half the budget (one shard here)


def test_a_shard_that_changed_on_the_server_since_indexing_is_one_line(digits_on_s3, tmp_path) -> None:
    local, s3 = digits_on_s3
    samples = open_samples(s3)
    store.upload_file(local / "shard-000000.tar", store.join(s3, "shard-000001.tar"))  # same name, other bytes
    for i in range(100):  # shard 0 is as indexed
        samples.encoded(i)
    with pytest.raises(UserError, match=r"shard-000001\.tar: changed on the server since it was indexed") as err:
        for i in range(100, 200):
            samples.encoded(i)
    assert "\n" not in str(err.value)
    assert len(cached_shards(tmp_path)) == 1  # nothing of the new version was kept


def test_mixture_layout_numbers_the_parts_shards_one_after_another(digits_on_s3) -> None:
    samples = open_samples(str(digits_on_s3[0]))
    shard_of, shard_bytes = Mixture([(samples, None), (samples, [5, 250])]).shard_layout()
    assert shard_of[:400].tolist() == [i // 100 for i in range(400)] and shard_of[400:].tolist() == [4, 6]
    assert len(shard_bytes) == 8 and shard_bytes[0] == (digits_on_s3[0] / "shard-000000.tar").stat().st_size


@pytest.mark.parametrize("name", ["UNSUPFT_SHARD_CACHE_MB", "UNSUPFT_SHUFFLE_WINDOW_MB"])
def test_a_bad_cache_or_window_setting_is_one_line(name: str, monkeypatch) -> None:
    from unsupft.data.shardcache import budget_bytes, window_bytes

    monkeypatch.setenv(name, "lots")
    with pytest.raises(UserError, match=rf"^{name}='lots': expected MiB"):
        budget_bytes() if name.endswith("CACHE_MB") else window_bytes()


def test_an_unwritable_cache_folder_falls_back_to_ranged_reads(digits_on_s3, tmp_path, monkeypatch) -> None:
    local, s3 = digits_on_s3
    samples = open_samples(s3)  # the index is cached where UNSUPFT_CACHE pointed until now
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("UNSUPFT_CACHE", str(blocker))
    expected = (local / "shard-000000.tar").read_bytes()
    for i in range(10):
        offset, size = int(samples.index.offset[i]), int(samples.index.size[i])
        assert samples.encoded(i) == expected[offset:offset + size]
    assert shard_cache().fetched == 0
