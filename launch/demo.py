"""`make demo`: the whole pipeline on the embedded default data set (MovieLens-100k).

Each step is a real `lmrec` command, printed before it runs, so this file doubles as a
walk-through of the command line. Everything lands in runs/demo/.
"""

from __future__ import annotations

import csv
import json
import shlex
import shutil
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


def main() -> None:
    lmrec("data", "fetch-ml100k", "--cache", CACHE)
    shards = RUN / "shards"
    # --item-text: each movie's title, year and genres through a pretrained sentence encoder, and
    # as hashed word tokens; the model (configs/ml-100k.yaml) adds both to the item ID embedding.
    lmrec("data", "prepare", "--source", "recbole", "--input", CACHE / "ml-100k", "--item-text", "--out", shards, "--overwrite", "--quiet")  # fmt: skip
    lmrec("data", "inspect", shards, "--verify")
    # Two ranks on this machine (torchrun underneath): TorchRec shards the item table, DeepSpeed
    # ZeRO-2 trains the rest.
    lmrec("launch", "local", "--nproc", 2, "--", "--config", "configs/ml-100k.yaml")
    lmrec("eval", RUN / "train" / "best", "--split", "test")
    # The serving artifact: int8 weights and item table, measured through the serving code on export.
    artifact = RUN / "artifact-int8"
    lmrec("export", RUN / "train" / "best", "--out", artifact, "--quant", "int8", "--overwrite")
    # Two movies released after MovieLens-100k was collected: no interactions, only text. The
    # served model places them by their text alone.
    new_items = RUN / "new-items.csv"
    with open(new_items, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(NEW_ITEMS[0]))
        writer.writeheader()
        writer.writerows(NEW_ITEMS)
    grown = RUN / "artifact-int8-new-items"
    lmrec("export", artifact, "--add-items", new_items, "--out", grown, "--overwrite")
    # Offline scoring of every user's history (the raw event file, as a TSV): who gets a new movie?
    events = RUN / "ml-100k-events.tsv"
    shutil.copyfile(CACHE / "ml-100k" / "ml-100k.inter", events)
    scores = RUN / "scores"
    lmrec("score", "--artifact", grown, "--input", events, "--user-col", "user_id:token", "--item-col", "item_id:token", "--time-col", "timestamp:float", "--out", scores, "--k", K, "--overwrite", "--quiet")  # fmt: skip
    user, history = user_recommended_a_new_item(scores, events)
    serve_and_recommend(grown, user, history)


def user_recommended_a_new_item(scores: Path, events: Path) -> tuple[int, list[int]]:
    """The first user whose top K holds a new movie, and that user's history (oldest first)."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    new = {movie["item"] for movie in NEW_ITEMS}
    table = pq.read_table(scores).sort_by("user")
    chosen = [(u, items) for u, items in zip(table["user"].to_pylist(), table["items"].to_pylist()) if new & set(items)]
    for movie in NEW_ITEMS:
        count = sum(movie["item"] in items for _, items in chosen)
        print(f"{movie['title']} (new, text only) is in the top {K} of {count} of {table.num_rows} users")
    if not chosen:
        sys.exit(f"demo step failed: no user has a new movie among the {K} recommendations")
    user = chosen[0][0]
    rows = pyarrow.csv.read_csv(events, parse_options=pyarrow.csv.ParseOptions(delimiter="\t")).to_pylist()
    mine = sorted((r["timestamp:float"], r["item_id:token"]) for r in rows if r["user_id:token"] == user)
    return user, [item for _, item in mine]


NEW_ITEMS = [
    {"item": 5001, "title": "Star Wars: Episode I - The Phantom Menace", "release_year": 1999, "genres": "Action Adventure Sci-Fi"},
    {"item": 5002, "title": "Toy Story 2", "release_year": 1999, "genres": "Animation Children's Comedy"},
]  # fmt: skip
K = 10


def movie_titles(items: list[int]) -> list[str]:
    import pyarrow.csv

    table = pyarrow.csv.read_csv(
        CACHE / "ml-100k" / "ml-100k.item",
        parse_options=pyarrow.csv.ParseOptions(delimiter="\t"),
        convert_options=pyarrow.csv.ConvertOptions(column_types={"release_year:token": "string"}),
    )
    title = dict(zip(table["item_id:token"].to_pylist(), table["movie_title:token_seq"].to_pylist()))
    return [title.get(i, str(i)) for i in items]


def serve_and_recommend(artifact: Path, user: int, history: list[int]) -> None:
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
        body = json.dumps({"history": history, "k": K})
        print(
            f'$ curl -s -X POST {url}/v1/recommend -d \'{{"history": [... user {user}\'s {len(history)} movies], "k": {K}}}\'',
            flush=True,
        )
        request = urllib.request.Request(f"{url}/v1/recommend", body.encode(), {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        print(json.dumps(answer))
        model = json.loads(urllib.request.urlopen(f"{url}/v1/model", timeout=30).read())
        print(f"\nModel {model['version']} ({model['quant']}), test NDCG@10 {model['metrics']['test']['NDCG@10']:.4f}.")
        print(f"Recommended for user {user}, whose last movies were {'; '.join(movie_titles(history[-5:]))}:")
        new = {movie["item"] for movie in NEW_ITEMS}
        for rank, (item, title, score) in enumerate(
            zip(answer["items"], answer["titles"], answer["scores"], strict=True), 1
        ):
            print(f"  {rank}. {title}  (score {score:.2f})" + ("  <- new item, text only" if item in new else ""))
        if len(answer["items"]) != K or answer["unknown_items"]:
            sys.exit(f"demo step failed: unexpected answer {answer}")
        if not new & set(answer["items"]):
            sys.exit(f"demo step failed: neither new item is among the {K} recommendations")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    if code != 0:
        sys.exit(f"demo step failed: the server exited with {code} on SIGTERM")
    print("server stopped", flush=True)


if __name__ == "__main__":
    main()
