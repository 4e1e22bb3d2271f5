"""What happens after a training step: log, evaluate, checkpoint, stop for preemption, stop.
One place decides it, from the progress (``TrainState``) and the signals every rank agreed on
(``StepSignals``), so every rank takes the same decision at the same step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist


@dataclass
class TrainState:
    """Where training stands: small, and saved in every checkpoint's meta.json as ``progress``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already trained on every rank
    best_ndcg: float = -1.0
    best_step: int = -1  # the checkpoint holding the best validation weights
    stale: int = 0  # evaluations since the last improvement
    evaluated_step: int = -1
    stopped_early: bool = False
    history: list = field(default_factory=list)  # one entry per evaluation
    loss_sum: float = 0.0  # global per-token losses since the last evaluation, summed
    loss_steps: int = 0
    tokens: int = 0
    training_seconds: float = 0.0
    elapsed_seconds: float = 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StepSignals:
    """Flags every rank must agree on (SIGTERM seen, out of time), carried in the step's one
    collective (the loss normaliser's all-reduce) and read from a host copy, so that agreeing
    costs neither an extra collective nor a device sync."""

    def __init__(self, device: torch.device):
        self.device = device
        # Page-locked on GPUs, so that both copies are asynchronous; the flags are written only
        # after ``agreed`` waited for the copies of the step before.
        pinned = device.type == "cuda"
        self.outgoing = torch.zeros(2, pin_memory=pinned)
        self.incoming = torch.zeros(2, pin_memory=pinned)
        self.ready = torch.cuda.Event() if pinned else None

    def reduce(self, weight_sum: torch.Tensor, preempted: bool, out_of_time: bool) -> torch.Tensor:
        """The global weight sum (a device tensor); the agreed flags follow in ``agreed``."""
        self.outgoing[0], self.outgoing[1] = float(preempted), float(out_of_time)
        flags = self.outgoing.to(self.device, non_blocking=True)
        control = torch.cat([weight_sum.detach().reshape(1), flags])
        if dist.is_initialized():
            dist.all_reduce(control)
        self.incoming.copy_(control[1:], non_blocking=True)
        if self.ready is not None:
            self.ready.record()
        return control[0]

    def agreed(self) -> tuple[bool, bool]:
        if self.ready is not None:
            self.ready.synchronize()  # waits for the all-reduce, not for the step's compute after it
        preempted, out_of_time = self.incoming.numpy() > 0
        return bool(preempted), bool(out_of_time)


@dataclass(frozen=True)
class Decision:
    log: bool = False  # a log step: the buffered losses are reduced and printed
    end_of_epoch: bool = False  # the epoch's last batch was trained; the next step starts the next epoch
    evaluate: bool = False  # validate (and keep the best weights)
    checkpoint: bool = False
    preempt: bool = False  # checkpoint and exit now (SIGTERM on some rank)
    stop: bool = False  # training is over (schedule done, out of steps or time, early stop)


class StepPolicy:
    def __init__(self, schedule, checkpoint, steps_per_epoch: int):
        self.schedule, self.checkpoint, self.steps_per_epoch = schedule, checkpoint, steps_per_epoch

    def out_of_steps(self, state) -> bool:
        return bool(self.schedule.max_steps) and state.step >= self.schedule.max_steps

    def at_start(self, state) -> Decision:
        """Before the first step of a (resumed) run: a run resumed at its end only finishes; one
        preempted after an epoch's last batch first does what that epoch's end does."""
        if state.epoch >= self.schedule.epochs or state.stopped_early:
            return Decision(stop=True)
        if state.batch >= self.steps_per_epoch:
            return replace(self.after_step(state, preempted=False, out_of_time=False), log=False)
        if self.out_of_steps(state):
            pending = state.evaluated_step != state.step
            return Decision(evaluate=pending, checkpoint=pending, stop=True)
        return Decision()

    def after_step(self, state, preempted: bool, out_of_time: bool) -> Decision:
        """``state`` after the step (its batch counted); the signals as every rank agreed on them."""
        if preempted:
            return Decision(preempt=True)
        schedule, every = self.schedule, self.checkpoint.every_steps
        end = state.batch >= self.steps_per_epoch
        epoch = state.epoch + 1 if end else state.epoch
        last = epoch >= schedule.epochs
        stop = out_of_time or self.out_of_steps(state) or (end and last)
        evaluate = stop or (end and epoch % schedule.eval_every == 0)
        return Decision(
            log=state.step % schedule.log_every == 0,
            end_of_epoch=end,
            evaluate=evaluate,
            checkpoint=evaluate or bool(every and state.step % every == 0),
            stop=stop,
        )
