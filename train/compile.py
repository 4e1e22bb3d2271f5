"""``parallel.compile``: torch.compile of the dense model's decoder blocks, as torchtitan does it
(block by block, in place, after the model is built and before DeepSpeed wraps it).

Blocks are what repeats, so one compiled graph serves every layer and the compile time does not
grow with depth; state-dict keys stay as they are (``Module.compile`` compiles in place), so
checkpoints and saved models do not depend on the flag. Shapes are dynamic: length-bucketed
batches change the sequence length every step. Inductor's cache lives in the environment
(``sys.prefix``), so a second run of the same model starts from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn


def decoder_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformers decoder layers: the modules the model declares unsplittable."""
    names = set(getattr(backbone, "_no_split_modules", None) or ())
    return [m for m in backbone.modules() if type(m).__name__ in names]


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on ``device`` (no C++ compiler for CPU inductor, no Triton for
    CUDA), found by compiling a one-line function; None when it can."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(4, device=device))
    except Exception as e:  # whatever inductor's toolchain raises, the run continues eagerly
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def compile_dense_blocks(backbone: nn.Module, log, device: torch.device) -> int:
    """Compiles each decoder block of ``backbone`` for training on ``device`` (the model moves
    there later, in deepspeed.initialize), in place; the number compiled (0: eager, with the
    reason logged)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing inductor already wrote its default (a temp dir) into the environment; a directory
    # the user chose is kept.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(sys.prefix) / "torchinductor_cache")
    blocks = decoder_blocks(backbone)
    if not blocks:
        log(f"parallel.compile: {type(backbone).__name__} declares no decoder blocks; training eagerly")
        return 0
    reason = compile_unavailable(device)
    if reason is not None:
        log(f"parallel.compile: torch.compile is unavailable here ({reason}); training eagerly")
        return 0
    for block in blocks:
        block.compile(dynamic=True)
    log(f"parallel.compile: {len(blocks)} decoder blocks compiled (the first steps include compilation)")
    return len(blocks)
