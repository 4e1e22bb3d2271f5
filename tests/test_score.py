"""Offline batch scoring: shards and event files in, one Parquet part per unit of work out."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from serve.offline import score
from serve.recommender import Recommender
from tests.conftest import ROOT, free_port, run_cli

pytestmark = pytest.mark.multiprocess


def _read(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).sort_by("user")


@pytest.fixture(scope="module")
def resharded(trained_run, tmp_path_factory):
    """The training events prepared again in 3 shards, against the training vocabulary."""
    shards, _ = trained_run
    out = tmp_path_factory.mktemp("score") / "shards3"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 300, "--num-items", 120, "--events-per-user", 15,
        "--out", out, "--samples-per-shard", 100, "--vocab-from", shards, "--quiet",
    )  # fmt: skip
    return out


def test_scoring_shards_with_workers_covers_every_user_and_resumes(resharded, artifacts, tmp_path):
    multi = tmp_path / "multi"
    done = run_cli("score", "--artifact", artifacts["int8"], "--input", resharded, "--out", multi, "--k", 7,
                   "--workers", 2, "--quiet")  # fmt: skip
    assert "scored 300 users in 3 parts" in done.stdout
    table = _read(multi)
    assert table.num_rows == 300 and (multi / "_SUCCESS").exists()
    assert all(len(items) == 7 for items in table["items"].to_pylist())
    rec = Recommender.load(artifacts["int8"])
    events = pq.read_table(resharded / "users.parquet")
    assert set(table["user"].to_pylist()) == set(events["raw_id"].to_pylist())
    # A rerun skips everything; a lost part is redone alone.
    (multi / "part-00001.parquet").unlink()
    (multi / "_SUCCESS").unlink()
    again = run_cli("score", "--artifact", artifacts["int8"], "--input", resharded, "--out", multi, "--k", 7, "--quiet")
    assert "2 of 3 parts already scored" in again.stdout and "scored" in again.stdout
    assert _read(multi).equals(table) and (multi / "_SUCCESS").exists()
    # Another job into the same directory is refused.
    other = run_cli("score", "--artifact", artifacts["int8"], "--input", resharded, "--out", multi, "--k", 8,
                    check=False)  # fmt: skip
    assert other.returncode == 2 and "different k" in other.stderr
    assert rec.version in (multi / "_job.json").read_text()
    # Shards indexed by another vocabulary would be scored as the wrong items: refused.
    reseeded = tmp_path / "reseeded"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 300, "--num-items", 120, "--events-per-user", 15,
        "--out", reseeded, "--seed", 7, "--quiet",
    )  # fmt: skip
    done = run_cli("score", "--artifact", artifacts["int8"], "--input", reseeded, "--out", tmp_path / "x", check=False)
    assert done.returncode == 2 and "prepared with another item vocabulary" in done.stderr


def test_torchrun_ranks_take_whole_parts(resharded, artifacts, tmp_path):
    out = tmp_path / "ranks"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "launch.cli", "score", "--artifact", str(artifacts["int8"]), "--input", str(resharded),
         "--out", str(out), "--k", "4", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert "scored 200 users in 2 parts" in done.stdout and "scored 100 users in 1 parts" in done.stdout
    assert (out / "_SUCCESS").exists() and _read(out).num_rows == 300


class Rank:
    """One rank of a two-rank job started by hand: `lmrec score` in torchrun's environment."""

    def __init__(self, rank, port, tmp_path, *args):
        self.log = open(tmp_path / f"rank{rank}-{port}.log", "w+")  # noqa: SIM115 - closed by the fixture
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "score", *map(str, args)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def finish(self, seconds=120) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank still running after {seconds} s:\n{self.output()}") from None
        return code, self.output()


@pytest.fixture
def start_rank(tmp_path):
    """Starts ranks; whatever happens in the test, none is left running (waiting for the others)."""
    started = []

    def start(rank, port, *args):
        started.append(Rank(rank, port, tmp_path, *args))
        return started[-1]

    yield start
    for rank in started:
        rank.process.kill()
        rank.process.wait()
        rank.log.close()


def test_overwrite_under_ranks_clears_the_output_before_any_rank_writes(resharded, artifacts, tmp_path, start_rank):
    single = tmp_path / "single"
    score(artifacts["int8"], [resharded], single, k=4, progress=False, log=lambda line: None)
    out = tmp_path / "ranks"
    job = ("--artifact", artifacts["int8"], "--input", resharded, "--out", out, "--quiet")
    port = free_port()
    # Rank 1 first, alone: it must wait for rank 0 to clear the directory (it used to score its
    # part at once, and rank 0's --overwrite then deleted it).
    rank1 = start_rank(1, port, *job, "--k", 4, "--overwrite")
    deadline = time.time() + 120
    while rank1.process.poll() is None and "joining the other ranks" not in rank1.output():
        assert time.time() < deadline, rank1.output()
        time.sleep(0.2)
    rank0 = start_rank(0, port, *job, "--k", 4, "--overwrite")
    finished = [rank0.finish(), rank1.finish()]
    assert [code for code, _ in finished] == [0, 0], finished
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert (out / "_SUCCESS").exists() and _read(out).equals(_read(single))
    assert all("output complete" in output for _, output in finished), finished
    # Another job into the directory is refused on every rank, and no rank waits for the others.
    port = free_port()
    finished = [rank.finish() for rank in [start_rank(r, port, *job, "--k", 5) for r in (0, 1)]]
    assert [code for code, _ in finished] == [2, 2], finished
    assert all("different k" in output for _, output in finished), finished


def test_scoring_event_files_equals_the_python_api(artifacts, tmp_path):
    rec = Recommender.load(artifacts["fp32"])
    raw = pq.read_table(artifacts["fp32"] / "vocab.parquet")["raw_id"].to_pylist()
    generator = np.random.default_rng(0)
    rows = []
    histories = {}
    for user in range(25):
        items = [raw[i] for i in generator.choice(len(raw), size=int(generator.integers(0, 9)), replace=False)]
        if user == 3:
            items.append(-42)  # unknown to the artifact
        histories[f"user{user}"] = items
        rows += [(f"user{user}", item, 1000 + 60 * t) for t, item in enumerate(items)]
    rows.reverse()  # out of order on purpose: scoring sorts by user and time
    events = tmp_path / "events.csv"
    pcsv.write_csv(
        pa.table({"uid": [r[0] for r in rows], "item": [r[1] for r in rows], "ts": [r[2] for r in rows]}), events
    )
    out = tmp_path / "scores"
    run_cli("score", "--artifact", artifacts["fp32"], "--input", events, "--out", out, "--k", 5,
            "--user-col", "uid", "--time-col", "ts", "--part-users", 10, "--quiet")  # fmt: skip
    table = _read(out)
    assert len(list(out.glob("part-*.parquet"))) == 3
    users = [u for u, h in histories.items() if h]  # users with no events are not in the file at all
    assert sorted(table["user"].to_pylist()) == sorted(users)
    expected = rec.recommend(
        [histories[u] for u in table["user"].to_pylist()],
        k=5,
        timestamps=[[1000 + 60 * t for t in range(len(histories[u]))] for u in table["user"].to_pylist()],
    )
    for got_items, got_scores, want in zip(
        table["items"].to_pylist(), table["scores"].to_pylist(), expected, strict=True
    ):
        assert got_items == want.items
        np.testing.assert_allclose(got_scores, want.scores, rtol=1e-4)
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["unknown_item_events"] == 1


def test_scoring_bad_input_is_named(artifacts, tmp_path):
    events = tmp_path / "events.csv"
    events.write_text("user,product\n1,2\n")
    done = run_cli("score", "--artifact", artifacts["int8"], "--input", events, "--out", tmp_path / "o", check=False)
    assert done.returncode == 2 and f"{events}: no item column 'item'" in done.stderr
    done = run_cli("score", "--artifact", artifacts["int8"], "--input", tmp_path / "none.parquet", "--out",
                   tmp_path / "o", check=False)  # fmt: skip
    assert done.returncode == 2 and "no such input" in done.stderr


OFFLINE_IMPORTS = """
import json, sys
from serve.offline import score
score(sys.argv[1], [sys.argv[2]], __import__("pathlib").Path(sys.argv[3]), k=3, progress=False)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_the_scoring_job_loads_the_shard_reader_but_no_training_stack(trained_run, artifacts, tmp_path):
    shards, _ = trained_run
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_IMPORTS, str(artifacts["int8"]), str(shards), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "data" in loaded
    assert not loaded & {"train", "launch", "deepspeed", "torchrec", "webdataset", "polars", "duckdb"}
