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


def main(
    config_path: str | None, overrides: list[str], resume: str | None = None, init_from: str | None = None
) -> dict:
    cfg = load_config(config_path, overrides)  # every config error surfaces before any process group
    from data.shards import load_manifest
    from train.pretrained import check_pretrained, load_pretrained
    from train.trainer import Trainer, check_data

    manifest = load_manifest(cfg.data.shards)
    check_data(cfg, manifest)
    check_device(cfg)
    pretrained = None
    if init_from:
        pretrained = load_pretrained(init_from)
        check_pretrained(pretrained, cfg, manifest.get("text"))
    env = compute_init(seed=cfg.schedule.seed)
    try:
        trainer = Trainer(cfg, env, pretrained)
        if resume:
            trainer.resume(resume)
        return trainer.train()
    finally:
        compute_cleanup()
