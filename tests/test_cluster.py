"""Against real daemons: a two-node SLURM cluster on 127.0.0.1 (Debian's slurmctld, two slurmd,
munge) and a real Prometheus scraping training ranks and a server. The packages are installed
when missing; the tests skip, saying why, only where that is impossible."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port, run_cli

pytestmark = pytest.mark.multiprocess
SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _ensure_installed(binaries: list[str], packages: list[str]) -> None:
    if all(shutil.which(b) for b in binaries):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(packages)} missing and this machine cannot install packages (needs root and apt-get)")
    done = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages], capture_output=True, text=True
    )
    if done.returncode != 0:
        done = subprocess.run(["bash", "-c", f"apt-get update -q && apt-get install -y -q --no-install-recommends {' '.join(packages)}"], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0 or not all(shutil.which(b) for b in binaries):
        pytest.skip(f"could not install {', '.join(packages)}: {done.stderr.strip()[-300:]}")


def _wait(condition, seconds: float, what: str, interval: float = 0.5):
    deadline = time.time() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)


SLURM_CONF = """\
ClusterName=lmrec-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=60
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port1} CPUs=2 RealMemory=1000
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port2} CPUs=2 RealMemory=1000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node cluster (n1, n2) on this host; every daemon is stopped by its PID afterwards."""
    _ensure_installed(["slurmctld", "slurmd", "sbatch", "munged"], SLURM_PACKAGES)
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool/n1", "spool/n2"):
        (base / sub).mkdir(parents=True)
    conf = base / "slurm.conf"
    conf.write_text(SLURM_CONF.format(dir=base, ctld_port=free_port(), port1=free_port(), port2=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        daemons.append(subprocess.Popen(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "-F"]))
        _wait(lambda: Path("/run/munge/munge.socket.2").exists(), 20, "munged")
    daemons.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=env))
    for node in ("n1", "n2"):
        daemons.append(subprocess.Popen(["slurmd", "-D", "-N", node], env=env))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:

        def idle():
            out = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], capture_output=True, text=True, env=env)
            return out.stdout.strip() == "2"

        _wait(idle, 60, f"two idle SLURM nodes (logs in {base})")
        yield base
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _submit(shards, root, *overrides, wait=True):
    args = [
        "launch", "slurm", "--nodes", 2, "--output-root", root, "--port", free_port(), "--submit",
        *(["--wait"] if wait else []), "--", "--config", "configs/debug.yaml", "--set", f"data.shards={shards}",
        "--set", "data.num_workers=1", *[x for o in overrides for x in ("--set", o)],
    ]  # fmt: skip
    done = run_cli(*args, check=False)
    found = re.search(r"submitted batch job (\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    return done, found.group(1)


def test_a_two_node_slurm_job_trains_on_both_nodes(slurm, trained_run, tmp_path):
    shards, _ = trained_run
    done, job = _submit(shards, tmp_path, "schedule.epochs=1")
    run = tmp_path / f"lmrec-{job}"
    log = (tmp_path / f"lmrec-{job}.out").read_text()
    assert done.returncode == 0, log[-3000:]
    assert "on node n1" in log and "on node n2" in log, log[-3000:]
    assert "lmrec: rank 0/2" in log and "lmrec: rank 1/2" in log
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["test"]["model"]["users"] == 300
    assert list((run / "checkpoints").glob("step_*"))


def test_a_requeued_slurm_job_resumes_from_its_checkpoint(slurm, trained_run, tmp_path):
    shards, _ = trained_run
    _, job = _submit(shards, tmp_path, "schedule.epochs=40", "checkpoint.every_steps=5", wait=False)
    run = tmp_path / f"lmrec-{job}"
    _wait(lambda: list((run / "checkpoints").glob("step_*")), 180, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True)

    def finished():
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state == "PENDING":  # a requeued job waits for its begin time; release it now
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        return state == ""

    _wait(finished, 420, f"job {job} to finish after its requeue", interval=2)
    log = (tmp_path / f"lmrec-{job}.out").read_text()
    assert "(restart 1)" in log, log[-3000:]
    assert re.search(r"resumed from .*step_\d+", log), log[-3000:]
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2


def test_sbatch_rejecting_the_script_is_shown(slurm, tmp_path):
    done = run_cli("launch", "slurm", "--nodes", 2, "--partition", "no-such-partition", "--submit", "--",
                   "--config", "configs/debug.yaml", check=False)  # fmt: skip
    assert done.returncode == 2
    assert "sbatch rejected the script" in done.stderr and "invalid partition" in done.stderr.lower(), done.stderr


# -- Prometheus ------------------------------------------------------------------------------------


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())["data"]["result"]
    except OSError:
        return []


def _two_free_ports() -> int:
    while True:
        port = free_port()
        if port < 65000:
            try:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def test_prometheus_scrapes_training_ranks_and_a_server(trained_run, artifacts, tmp_path):
    _ensure_installed(["prometheus"], ["prometheus"])
    from tests.test_http import Server

    shards, _ = trained_run
    train_port, prometheus_port = _two_free_ports(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    training = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "launch.cli", "train", "--config", "configs/debug.yaml", "--set", f"data.shards={shards}",
         "--set", f"output.dir={tmp_path / 'run'}", "--set", "schedule.epochs=500", "--set", "schedule.eval_every=2", "--set", "schedule.patience=1000",
         "--set", f"output.metrics_port={train_port}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = Server(artifacts["int8"], tmp_path)
    config = yaml.safe_load((ROOT / "launch" / "monitoring" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["lmrec-train"]["static_configs"] = [{"targets": [f"127.0.0.1:{train_port}", f"127.0.0.1:{train_port + 1}"]}]
    jobs["lmrec-serve"]["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import httpx

        history = {"history": [2, 3, 4], "k": 5}
        for _ in range(5):
            assert httpx.post(f"{server.url}/v1/recommend", json=history).status_code == 200

        def tokens():
            series = _query(prometheus_port, "lmrec_train_tokens_total")
            return {s["metric"]["rank"]: float(s["value"][1]) for s in series} if len(series) == 2 else None

        first = _wait(tokens, 90, "both ranks' token counters in Prometheus")
        later = _wait(lambda: (t := tokens()) and all(t[r] > first[r] for r in first) and t, 60, "counters to rise")
        assert set(later) == {"0", "1"}
        buckets = _wait(
            lambda: _query(prometheus_port, 'lmrec_serve_request_seconds_bucket{endpoint="/v1/recommend"}'),
            30,
            "the request-latency histogram",
        )
        assert any(float(b["value"][1]) >= 5 for b in buckets if b["metric"]["le"] == "+Inf")
        # Every metric the Grafana dashboard plots is one that Prometheus actually scraped. The
        # evaluation metrics appear with the first validation, which may come after the counters.
        dashboard = json.loads((ROOT / "launch" / "monitoring" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        used = {m for e in exprs for m in re.findall(r"\blmrec_[a-z_]+", e)}

        def scraped():
            return {s["metric"]["__name__"] for s in _query(prometheus_port, "{__name__=~'lmrec_.+'}")}

        with contextlib.suppress(AssertionError):
            _wait(lambda: used <= scraped(), 60, "every metric the dashboard plots")
        assert used and used <= scraped(), used - scraped()
    finally:
        prometheus.terminate()
        training.send_signal(signal.SIGTERM)
        server.stop()
        prometheus.wait(timeout=30)
        training.wait(timeout=90)
