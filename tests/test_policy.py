"""The step policy's decisions, by hand."""

from types import SimpleNamespace

from train.policy import Decision, StepPolicy, TrainState


def _policy(epochs=3, every=0, eval_every=1, max_steps=0):
    schedule = SimpleNamespace(epochs=epochs, eval_every=eval_every, max_steps=max_steps, log_every=4)
    return StepPolicy(schedule, SimpleNamespace(every_steps=every), steps_per_epoch=10)


def test_a_run_preempted_after_an_epochs_last_batch_ends_that_epoch_when_it_resumes():
    # SIGTERM after step 10, the last batch of epoch 0: the checkpoint says epoch 0, batch 10.
    policy = _policy()
    state = TrainState(step=10, epoch=0, batch=10)
    assert policy.after_step(state, preempted=True, out_of_time=False) == Decision(preempt=True)
    resumed = policy.at_start(state)
    assert resumed == Decision(end_of_epoch=True, evaluate=True, checkpoint=True)
    last = policy.at_start(TrainState(step=30, epoch=2, batch=10))
    assert last.end_of_epoch and last.evaluate and last.stop


def test_start_and_step_decisions():
    policy = _policy(every=5)
    assert policy.at_start(TrainState(step=3, epoch=0, batch=3)) == Decision()
    assert policy.at_start(TrainState(step=30, epoch=3)) == Decision(stop=True)
    assert policy.after_step(TrainState(step=5, epoch=0, batch=5), False, False) == Decision(checkpoint=True)
    assert policy.after_step(TrainState(step=8, epoch=0, batch=8), False, False) == Decision(log=True)
    assert policy.after_step(TrainState(step=9, epoch=0, batch=9), False, True) == Decision(
        evaluate=True, checkpoint=True, stop=True
    )
