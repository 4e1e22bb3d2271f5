import shutil

import pytest

from data.errors import DataError
from data.loader import LoaderConfig, iterate_epoch, make_loader, plan_epoch
from data.prepare import PrepareConfig, prepare
from data.shards import load_manifest
from data.synthetic import SyntheticSpec, generate


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "shards"
    raw = generate(SyntheticSpec(users=203, items=150, events_per_user=10, seed=1))
    prepare(raw, PrepareConfig(out=out, samples_per_shard=20, progress=False), {"name": "test"})
    return out


def _epoch(directory, world, split="train", workers=2, epoch=0, **kw):
    """All batches of every rank for one epoch, each rank through a real DataLoader with workers."""
    per_rank = []
    for rank in range(world):
        dataset, loader = make_loader(
            directory, LoaderConfig(split=split, batch_size=8, num_workers=workers, **kw), rank, world
        )
        dataset.set_epoch(epoch)
        per_rank.append(list(loader))
    return per_rank


def _users(batches):
    return [u for b in batches for u, w in zip(b["users"].tolist(), b["weights"].tolist()) if w > 0]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("samples_per_shard", [20, 500])  # 11 shards for 4 slots; 1 shard shared by 4 slots
def test_two_ranks_two_workers_cover_every_sample_exactly_once(tmp_path, split, samples_per_shard):
    out = tmp_path / "s"
    raw = generate(SyntheticSpec(users=203, items=150, events_per_user=10, seed=1))
    manifest = prepare(
        raw, PrepareConfig(out=out, samples_per_shard=samples_per_shard, progress=False), {"name": "t"}
    ).manifest
    ranks = _epoch(out, world=2, split=split)
    users = _users(ranks[0]) + _users(ranks[1])
    assert len(users) == len(set(users)) == manifest["counts"]["samples_per_split"][split]
    assert set(_users(ranks[0])).isdisjoint(_users(ranks[1]))
    # Every rank runs the same number of steps; the difference is zero-weight padding.
    assert len(ranks[0]) == len(ranks[1])


def test_shuffle_is_deterministic_per_epoch_and_changes_between_epochs(shards):
    a = _users(_epoch(shards, world=1, epoch=0)[0])
    b = _users(_epoch(shards, world=1, epoch=0)[0])
    c = _users(_epoch(shards, world=1, epoch=1)[0])
    assert a == b
    assert a != c and sorted(a) == sorted(c)


def test_evaluation_order_is_not_shuffled(shards):
    users = _users(_epoch(shards, world=1, split="valid", workers=0)[0])
    assert users == sorted(users)


@pytest.mark.parametrize("skip", [0, 7, 8, 20])
def test_resume_continues_in_exactly_the_uninterrupted_order(shards, skip):
    dataset, loader = make_loader(shards, LoaderConfig(batch_size=8, num_workers=2))
    full = list(iterate_epoch(dataset, loader, epoch=3))
    rest = list(iterate_epoch(dataset, loader, epoch=3, skip=skip))
    assert [(b["slot"], b["slot_batch"]) for b in rest] == [(b["slot"], b["slot_batch"]) for b in full[skip:]]
    assert [b["users"].tolist() for b in rest] == [b["users"].tolist() for b in full[skip:]]
    assert len(full) == len(dataset)


def test_plan_balances_steps_with_padding_batches(shards):
    manifest = load_manifest(shards)
    plan = plan_epoch(manifest, LoaderConfig(batch_size=8, num_workers=2), world_size=3, epoch=0)
    workers = 2
    for rank in range(3):
        slots = plan.slots[rank * workers : (rank + 1) * workers]
        assert sum(s.batches + s.padding for s in slots) == plan.steps_per_epoch
    assert sum(s.samples for s in plan.slots) == manifest["counts"]["samples_per_split"]["train"]


def test_truncated_shard_is_named(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = copy / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    _, loader = make_loader(copy, LoaderConfig(batch_size=8, num_workers=0, shuffle=False))
    with pytest.raises(DataError, match=r"shard .*shard-000003\.tar is corrupt or truncated"):
        list(loader)


def test_corrupt_shard_is_named(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = copy / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[520:620] = b"\xff" * 100  # the first member's .npy header
    victim.write_bytes(bytes(data))
    _, loader = make_loader(copy, LoaderConfig(split="valid", batch_size=8, num_workers=0))
    with pytest.raises(DataError, match=r"shard-000001\.tar is corrupt: sample u\d+w000 does not decode"):
        list(loader)
    data[148:150] = b"77"  # a tar header checksum
    victim.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"shard-000001\.tar is corrupt or truncated after 0 samples: bad header checksum"
    ):
        list(loader)


def test_missing_shard_is_named(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "shard-000002.tar").unlink()
    _, loader = make_loader(copy, LoaderConfig(split="test", batch_size=8, num_workers=0))
    with pytest.raises(DataError, match=r"shard-000002\.tar is missing"):
        list(loader)


def test_batches_are_right_padded_and_truncated_to_max_len(shards):
    _, loader = make_loader(shards, LoaderConfig(batch_size=16, num_workers=0, max_len=6, shuffle=False))
    for batch in loader:
        lengths = batch["lengths"]
        assert int(lengths.max()) <= 7  # max_len + 1 for the next-item shift
        assert batch["items"].shape[1] == int(lengths.max())
        for row, n in enumerate(lengths.tolist()):
            assert (batch["items"][row, :n] >= 2).all() and (batch["items"][row, n:] == 0).all()
            assert (batch["gaps"][row, n:] == 0).all() and (batch["actions"][row, :n] >= 2).all()


def test_webdataset_reads_the_shards_as_they_are(shards):
    import webdataset as wds

    manifest = load_manifest(shards)
    urls = [str(shards / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == manifest["counts"]["samples"]
    assert set(samples[0]) >= {"__key__", "train.npy", "valid.npy", "test.npy"}


def _padding(batches) -> tuple[int, int]:
    real = sum(int(b["lengths"][b["weights"] > 0].sum()) for b in batches)
    cells = sum(b["items"].numel() for b in batches if (b["weights"] > 0).any())
    return real, cells


def test_length_buckets_keep_every_sample_once_pad_less_and_balance_the_ranks(shards):
    kw = {"shuffle_buffer": 48, "max_len": 30}  # runs of 6 batches of 8
    plain, bucketed = _epoch(shards, world=2, **kw), _epoch(shards, world=2, length_buckets=True, **kw)
    for rank in range(2):
        assert sorted(_users(bucketed[rank])) == sorted(_users(plain[rank]))
        assert len(bucketed[rank]) == len(plain[rank])
    real, cells = map(sum, zip(*(_padding(b) for b in plain), strict=True))
    real_b, cells_b = map(sum, zip(*(_padding(b) for b in bucketed), strict=True))
    assert real_b == real and cells_b < 0.8 * cells

    # The j-th batches of the two ranks hold the same length quantile of their runs: their token
    # counts differ far less than those of unbucketed batches.
    def spread(ranks):
        return sum(abs(int(a["lengths"].sum()) - int(b["lengths"].sum())) for a, b in zip(*ranks, strict=True))

    assert spread(bucketed) < 0.5 * spread(plain)
    # Another epoch draws another order, not another bucketing of the same batches.
    other = _epoch(shards, world=2, length_buckets=True, epoch=1, **kw)
    assert [b["users"].tolist() for b in other[0]] != [b["users"].tolist() for b in bucketed[0]]


@pytest.mark.parametrize("skip", [0, 5, 13])
def test_length_buckets_resume_in_exactly_the_uninterrupted_order(shards, skip):
    dataset, loader = make_loader(
        shards, LoaderConfig(batch_size=8, num_workers=2, length_buckets=True, shuffle_buffer=40)
    )
    full = list(iterate_epoch(dataset, loader, epoch=2))
    rest = list(iterate_epoch(dataset, loader, epoch=2, skip=skip))
    assert [b["users"].tolist() for b in rest] == [b["users"].tolist() for b in full[skip:]]
