"""`lmrec train`: parse the config, build, train, clean up. Runs as one plain process, under
torchrun, or under the deepspeed launcher; train/distributed.py reads whichever environment."""

from __future__ import annotations

import torch

from train.config import Config, ConfigError, load_config
from train.distributed import compute_cleanup, compute_init


def check_device(cfg: Config) -> None:
    if cfg.optim.sparse_optimizer == "adam" and not torch.cuda.is_available():
        raise ConfigError(
            "optim.sparse_optimizer adam: fbgemm's fused Adam runs on GPUs only; use rowwise_adagrad on CPU"
        )


def setup(config_path: str | None, overrides: list[str], init_from: str | None = None):
    """The config and the ``--init-from`` source (train.pretrained.Pretrained, or None), with
    every config, data and source error raised here, before any process group exists."""
    cfg = load_config(config_path, overrides)
    from data.shards import load_manifest
    from train.pretrained import load_pretrained
    from train.trainer import check_data

    manifest = load_manifest(cfg.data.shards)
    check_data(cfg, manifest)
    check_device(cfg)
    pretrained = load_pretrained(init_from, cfg, manifest) if init_from else None
    return cfg, pretrained


def main(
    config_path: str | None, overrides: list[str], resume: str | None = None, init_from: str | None = None
) -> dict:
    cfg, pretrained = setup(config_path, overrides, init_from)
    from train.trainer import Trainer

    env = compute_init(seed=cfg.schedule.seed)
    try:
        trainer = Trainer(cfg, env, pretrained)
        if resume:
            trainer.resume(resume)
        return trainer.train()
    finally:
        compute_cleanup()
