"""The dependency direction, checked in fresh interpreters: importing every module of a package
must not load what that package may not depend on."""

import json
import pkgutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RULES = {
    "data": ["model", "train", "serve", "launch", "deepspeed", "torchrec", "transformers"],
    "model": ["data", "train", "serve", "launch", "deepspeed", "torchrec", "webdataset", "polars"],
    # train and serve both import it, so it may depend on neither: numpy and torch only.
    "metrics": [
        "data",
        "model",
        "train",
        "serve",
        "launch",
        "deepspeed",
        "torchrec",
        "transformers",
        "webdataset",
        "polars",
        "pyarrow",
    ],
    # FAISS only when an artifact with an item index is loaded or built.
    "serve": ["train", "launch", "deepspeed", "torchrec", "webdataset", "polars", "duckdb", "faiss"],
    "launch": ["train", "deepspeed", "torchrec"],  # the CLI imports train lazily, inside subcommands
}


def _modules(package: str) -> list[str]:
    path = ROOT / package
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def _loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(done.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("package", sorted(RULES))
def test_dependency_direction(package):
    for module in _modules(package):
        if module == "launch.demo":
            continue  # a script: it only calls the command line in subprocesses
        forbidden = set(RULES[package]) & _loaded_after_import(module)
        assert not forbidden, f"importing {module} loads {sorted(forbidden)}"
