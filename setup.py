from setuptools import setup

# The top-level folders are the import packages themselves (`from data.shards import ...`).
PACKAGES = ["data", "model", "metrics", "train", "serve", "launch"]

setup(
    name="lmrec",
    version="0.1.0",
    description="Generative recommenders as causal language models over behavior tokens",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_data={"launch": ["monitoring/*"], "serve": ["*.c"]},  # serve/topk.c: compiled on first use
    install_requires=["numpy", "pyarrow", "pyyaml", "pydantic", "tqdm"],
    extras_require={
        # torchrec, fbgemm and deepspeed are installed by `make install` in the order that works.
        "train": [
            "torch",
            "transformers",
            "safetensors",
            "webdataset",
            "polars",
            "duckdb",
            "pyspark[sql]",
            "prometheus-client",
            "psutil",
            "matplotlib",
            "tensorboard",
        ],
        "serve": [
            "torch",
            "transformers",
            "safetensors",
            "fastapi",
            "uvicorn",
            "httpx",
            "prometheus-client",
            "faiss-cpu",
        ],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "schemathesis", "ruff"],
    },
    entry_points={"console_scripts": ["lmrec=launch.cli:main"]},
)
