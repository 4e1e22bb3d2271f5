"""Imported only by the dataloader workers' forkserver (``data.loader`` preloads it there): a
preemption SIGTERM sent to the whole process group must not end the forkserver while the rank
is still checkpointing (see ``data.loader._init_worker`` for the workers themselves)."""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
