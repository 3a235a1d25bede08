"""What the trainer process prints: one progress line at a time on stdout, from the main process only.

The launcher (``retrain.train.launch``) streams stdout into the Airflow task log line by line, so every line here
is written to be read there: step, loss, tokens/s, elapsed time and ETA, evaluations and checkpoints.
"""

from __future__ import annotations

import time

from retrain import settings


def is_main_process() -> bool:
    return settings.process_rank() == 0


def say(message: str) -> None:
    """One progress line on stdout (main process only): the launcher streams these into the task log."""
    if is_main_process():
        print(message, flush=True)


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """TrainerCallback printing one line per log/eval/save event: step, loss, tokens/s, ETA."""

    def __new__(cls, *args, **kwargs):
        # Subclass TrainerCallback lazily so importing this module stays light.
        from transformers import TrainerCallback

        class _Progress(TrainerCallback):
            def __init__(self) -> None:
                self.t0 = time.time()
                self.step_started = self.t0
                self.train_seconds = 0.0  # time inside optimizer steps only: no evaluation, no checkpointing
                self.steps_timed = 0
                self.eval_seconds: list[float] = []
                self.last = (0.0, 0.0)  # (train_seconds, tokens) at the previous training log
                self.tokens_per_second: list[float] = []

            def on_train_begin(self, args, state, control, **kw):
                self.t0 = time.time()

            def on_step_begin(self, args, state, control, **kw):
                self.step_started = time.time()

            def on_step_end(self, args, state, control, **kw):
                self.train_seconds += time.time() - self.step_started
                self.steps_timed += 1

            def _eta(self, args, state) -> float | None:
                if not self.steps_timed:
                    return None
                left = state.max_steps - state.global_step
                eta = self.train_seconds / self.steps_timed * left
                if self.eval_seconds and args.eval_steps:
                    evals_left = state.max_steps // args.eval_steps - state.global_step // args.eval_steps
                    eta += sum(self.eval_seconds) / len(self.eval_seconds) * evals_left
                return eta

            def on_log(self, args, state, control, logs=None, **kw):
                if not state.is_world_process_zero or not logs:
                    return
                if "loss" in logs:
                    tps = ""
                    tokens = logs.get("num_tokens")
                    if tokens is not None:
                        s_prev, n_prev = self.last
                        if self.train_seconds > s_prev and tokens > n_prev:
                            rate = (tokens - n_prev) / (self.train_seconds - s_prev)
                            self.tokens_per_second.append(rate)
                            tps = f" tokens/s {rate:.0f}"
                        self.last = (self.train_seconds, float(tokens))
                    lr = logs.get("learning_rate")
                    eta = self._eta(args, state)
                    say(
                        f"[train] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                        + (f" lr {lr:.2e}" if isinstance(lr, float) else "")
                        + tps
                        + f" elapsed {fmt_seconds(time.time() - self.t0)}"
                        + (f" eta {fmt_seconds(eta)}" if eta is not None else "")
                    )
                elif "eval_loss" in logs:
                    if isinstance(logs.get("eval_runtime"), (int, float)):
                        self.eval_seconds.append(float(logs["eval_runtime"]))
                    # The Trainer updates best_metric after this callback: include the loss just measured.
                    best = min(x for x in (state.best_metric, logs["eval_loss"]) if isinstance(x, float))
                    say(
                        f"[eval] step {state.global_step}/{state.max_steps} eval_loss {logs['eval_loss']:.4f}"
                        + (f" (best {best:.4f})" if isinstance(best, float) else "")
                        + (f" in {fmt_seconds(self.eval_seconds[-1])}" if self.eval_seconds else "")
                    )

            def on_save(self, args, state, control, **kw):
                say(f"[save] checkpoint-{state.global_step}")

        return _Progress(*args, **kwargs)
