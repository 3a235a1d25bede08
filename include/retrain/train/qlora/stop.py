"""Pause a training run at a given optimizer step (``TrainingSpec.stop_at_step``) without changing its schedule.

A sweep's successive halving trains every candidate for a first budget, then continues only the best ones: the
first rung must end on a checkpoint (evaluated, so early stopping and best-model tracking stay consistent) with the
learning-rate schedule of the *full* run, so that resuming to max_steps computes exactly what one uninterrupted run
would have. ``stop_at_step`` is left out of the checkpoint fingerprint for that reason.
"""

from __future__ import annotations


def stop_at_step_callback(step: int):
    """A transformers TrainerCallback that evaluates, saves and stops at optimizer step ``step``."""
    from transformers import TrainerCallback

    class StopAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True
                control.should_save = True
                control.should_evaluate = args.eval_strategy != "no"
            return control

    return StopAtStep()
