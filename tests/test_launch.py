"""`lmrec launch`: rendered job files, bad input, and two "nodes" on one host through torchrun and
the deepspeed launcher, compared with a 2-process single-node run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, free_port, run_cli, run_losses, torchrun_train

pytestmark = pytest.mark.multiprocess
STEPS = ["--set", "schedule.max_steps=4", "--set", "schedule.epochs=1", "--set", "data.num_workers=1"]


def _train_args(shards, out):
    return ["--config", "configs/debug.yaml", "--set", f"data.shards={shards}", "--set", f"output.dir={out}", *STEPS]


@pytest.fixture(scope="module")
def reference(trained_run, tmp_path_factory):
    shards, _ = trained_run
    summary, _ = torchrun_train(tmp_path_factory.mktemp("ref") / "run", shards, *[s for s in STEPS if s != "--set"])
    return shards, summary["losses"]


def _two_nodes(commands, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    processes = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outputs


def test_two_torchrun_nodes_on_one_host_match_a_single_node_run(reference, tmp_path):
    shards, losses = reference
    master = f"127.0.0.1:{free_port()}"
    commands = [
        [sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", "1", "--nnodes", "2", "--node-rank",
         str(k), "--master", master, "--", *_train_args(shards, tmp_path / "run")]
        for k in (0, 1)
    ]  # fmt: skip
    outputs = _two_nodes(commands)
    assert "lmrec: rank 0/2" in "".join(outputs) and "lmrec: rank 1/2" in "".join(outputs)
    two_nodes = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert two_nodes["world_size"] == 2
    np.testing.assert_allclose(list(run_losses(tmp_path / "run").values()), losses, rtol=1e-5)


def test_deepspeed_launcher_with_a_hostfile_matches_a_single_node_run(reference, tmp_path):
    shards, losses = reference
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    master = f"127.0.0.1:{free_port()}"
    commands = [
        [sys.executable, "-m", "launch.cli", "launch", "deepspeed", "--hostfile", str(hostfile), "--node-rank",
         str(k), "--master", master, "--", *_train_args(shards, tmp_path / "run")]
        for k in (0, 1)
    ]  # fmt: skip
    outputs = _two_nodes(commands)
    assert "(local 0/1)" in outputs[1]  # the launcher's LOCAL_SIZE reaches the planner as one rank per node
    launched = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert launched["world_size"] == 2
    np.testing.assert_allclose(list(run_losses(tmp_path / "run").values()), losses, rtol=1e-5)


def test_a_rendezvous_that_never_completes_times_out_naming_the_endpoint(trained_run, tmp_path):
    shards, _ = trained_run
    master = f"127.0.0.1:{free_port()}"
    done = run_cli(
        "launch", "local", "--nproc", 1, "--nnodes", 2, "--master", master, "--rdzv-timeout", 3,
        "--", *_train_args(shards, tmp_path / "run"), check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"lmrec: error: the rendezvous at {master} did not complete" in done.stderr


def test_slurm_script_is_one_task_per_node_with_requeue_and_valid_bash(tmp_path):
    done = run_cli(
        "launch", "slurm", "--nodes", 4, "--gpus-per-node", 8, "--cpus-per-task", 32, "--partition", "gpu",
        "--time", "04:00:00", "--account", "recsys", "--dry-run", "--", "--config", "configs/ml-1m.yaml",
        "--set", "optim.lr=0.001",
    )  # fmt: skip
    script = done.stdout
    for directive in (
        "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=32", "--partition=gpu",
        "--time=04:00:00", "--account=recsys", "--requeue", "--signal=TERM@120",
        "--output=runs/slurm/%x-%j.out",
    ):  # fmt: skip
        assert f"#SBATCH {directive}\n" in script, directive
    assert "--nnodes=$SLURM_NNODES --nproc_per_node=8" in script
    assert "--rdzv_backend=c10d --rdzv_endpoint=$head_addr:29500" in script
    assert "--config configs/ml-1m.yaml --set optim.lr=0.001 --set output.dir=runs/slurm/" in script
    assert script.rstrip().endswith("--resume auto'")
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


def test_k8s_manifest_has_the_pytorchjob_structure():
    done = run_cli(
        "launch", "k8s", "--name", "rec", "--image", "registry.example/lmrec:1", "--nodes", 3, "--gpus-per-node", 4,
        "--memory", "64Gi", "--grace", 150, "--", "--config", "configs/ml-1m.yaml",
    )  # fmt: skip
    job = yaml.safe_load(done.stdout)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "rec"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    for spec in specs.values():
        assert spec["restartPolicy"] == "OnFailure"
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 150
        [container] = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "registry.example/lmrec:1"
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 4, "memory": "64Gi"}
        command = container["command"][-1]
        assert "--nnodes=3 --nproc_per_node=4 --node_rank=$RANK" in command
        assert "--master_addr=$MASTER_ADDR --master_port=$MASTER_PORT" in command
        assert "--set output.dir=/runs/rec --resume auto" in command
        assert container["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "lmrec-runs"
    single = yaml.safe_load(run_cli("launch", "k8s", "--image", "x", "--nodes", 1, "--", "--config", "c").stdout)
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deepspeed", "--hostfile", "no/such/hostfile"], "--hostfile no/such/hostfile: no such file"),
        (["slurm", "--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["slurm", "--nodes", "-2"], "--nodes must be >= 1, got -2"),
        (["k8s", "--image", "x", "--nodes", "0"], "--nodes must be >= 1"),
        (["local", "--nproc", "64", "--gpus"], "--gpus: 64 GPUs requested, this machine has"),
        (["local", "--nproc", "1", "--nnodes", "2"], "--master HOST:PORT is required"),
        (["local", "--nproc", "1", "--nnodes", "2", "--master", "nohost"], "expected HOST:PORT"),
        (["local", "--nproc", "1", "--nnodes", "2", "--node-rank", "2", "--master", "h:1"], "outside [0, 2)"),
    ],
)
def test_bad_launch_input_is_one_clear_line(args, message, tmp_path):
    done = run_cli("launch", *args, "--", "--config", "configs/debug.yaml", check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_hostfile_line_is_named(tmp_path):
    (tmp_path / "hosts").write_text("node-a slots=1\nnode-b four\n")
    done = run_cli("launch", "deepspeed", "--hostfile", tmp_path / "hosts", "--", "--config", "x", check=False)
    assert done.returncode == 2 and f"{tmp_path / 'hosts'}:2: expected 'HOSTNAME slots=N'" in done.stderr
