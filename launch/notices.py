"""Library notices that lmrec cannot fix where they are raised, silenced by their exact text so
that a training start prints lmrec's own lines. Everything else still shows. Installed by the
command line before any subcommand runs, which covers every rank torchrun, the deepspeed
launcher or srun starts (each runs ``-m launch.cli``)."""

from __future__ import annotations

import logging
import warnings


class _DropFxTracingNotice(logging.Filter):
    # torch calls its own deprecated is_fx_tracing() whenever a TorchRec KeyedJaggedTensor is built.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("is_fx_tracing will return true for both fx.symbolic_trace")


_FX_NOTICE = _DropFxTracingNotice()


def install() -> None:
    logging.getLogger("torch.fx._symbolic_trace").addFilter(_FX_NOTICE)
    # DeepSpeed's ZeRO collectives (deepspeed/comm/torch.py) call these; it has no other path.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )
    # TorchRec's sharded tables are ShardedTensors; DCP touches them on every load.
    warnings.filterwarnings(
        "ignore",
        message=r"Please use DTensor instead and we are deprecating ShardedTensor",
        category=FutureWarning,
        module=r"torch\.distributed\.checkpoint\.",
    )
    # Reading a checkpoint's table rows in one process (export, consolidation) passes no_dist=True
    # and is told anyway.
    warnings.filterwarnings(
        "ignore",
        message=r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
        r"single process",
        category=UserWarning,
        module=r"torch\.distributed\.checkpoint\.utils",
    )
