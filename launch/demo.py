"""`make demo`: the whole pipeline on the embedded default data set (MovieLens-100k).

Each step is a real `lmrec` command, printed before it runs, so this file doubles as a
walk-through of the command line. Everything lands in runs/demo/.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("runs/demo")
CACHE = Path(".cache")


def run(shown: list[str], actual: list[str]) -> None:
    print(f"\n$ {shlex.join(shown)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(actual, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"demo step failed ({done.returncode}): {shlex.join(shown)}")
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)


def lmrec(*args) -> None:
    args = [str(a) for a in args]
    run(["lmrec", *args], [sys.executable, "-m", "launch.cli", *args])


def torchrun_lmrec(nproc: int, *args) -> None:
    args = [str(a) for a in args]
    launcher = ["torchrun", f"--nproc_per_node={nproc}"]
    run(
        [*launcher, "-m", "launch.cli", *args],
        [sys.executable, "-m", "torch.distributed.run", *launcher[1:], "-m", "launch.cli", *args],
    )


def main() -> None:
    lmrec("data", "fetch-ml100k", "--cache", CACHE)
    shards = RUN / "shards"
    lmrec("data", "prepare", "--source", "recbole", "--input", CACHE / "ml-100k", "--out", shards, "--overwrite", "--quiet")  # fmt: skip
    lmrec("data", "inspect", shards, "--verify")
    # Two ranks on this machine: TorchRec shards the item table, DeepSpeed ZeRO-2 trains the rest.
    torchrun_lmrec(2, "train", "--config", "configs/ml-100k.yaml")
    lmrec("eval", "--model", RUN / "train" / "best", "--split", "test")
    # The serving artifact: int8 weights and item table, measured through the serving code on export.
    artifact = RUN / "artifact-int8"
    lmrec("export", RUN / "train" / "best", "--out", artifact, "--quant", "int8", "--overwrite")
    serve_and_recommend(artifact)


# A viewer of Star Wars, Return of the Jedi, Raiders of the Lost Ark, Toy Story and Fargo
# (MovieLens-100k item IDs, oldest first).
HISTORY = [50, 181, 174, 1, 100]


def serve_and_recommend(artifact: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", str(artifact), "--port", str(port)]
    print(f"\n$ {shlex.join(['lmrec', *args])} &", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                sys.exit(f"demo step failed: the server exited with {server.returncode}")
            try:
                urllib.request.urlopen(f"{url}/readyz", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline:
                    sys.exit("demo step failed: the server did not become ready in 120 s")
                time.sleep(0.3)
        body = json.dumps({"history": HISTORY, "k": 5})
        print(f"$ curl -s -X POST {url}/v1/recommend -d '{body}'", flush=True)
        request = urllib.request.Request(f"{url}/v1/recommend", body.encode(), {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        print(json.dumps(answer))
        model = json.loads(urllib.request.urlopen(f"{url}/v1/model", timeout=30).read())
        print(f"\nModel {model['version']} ({model['quant']}), test NDCG@10 {model['metrics']['test']['NDCG@10']:.4f}.")
        print("Recommended for a viewer of Star Wars, Return of the Jedi, Raiders, Toy Story and Fargo:")
        for rank, (title, score) in enumerate(zip(answer["titles"], answer["scores"], strict=True), 1):
            print(f"  {rank}. {title}  (score {score:.2f})")
        if len(answer["items"]) != 5 or answer["unknown_items"]:
            sys.exit(f"demo step failed: unexpected answer {answer}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    if code != 0:
        sys.exit(f"demo step failed: the server exited with {code} on SIGTERM")
    print("server stopped", flush=True)


if __name__ == "__main__":
    main()
