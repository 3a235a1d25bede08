"""CPU training fixes that reach into third-party internals (TRL, bitsandbytes).

Two kinds, kept apart on purpose:

* **Process-wide patches** of TRL module globals (:func:`smaller_lm_head_tiles_on_cpu`,
  :func:`score_only_labelled_tokens_on_cpu`). They change TRL for everything in the process, so they are applied
  only by the trainer's entry point (``retrain.train.qlora.trainer.train``, in the child process that
  ``retrain.train.launch`` starts), through :func:`cpu_speedups`, which restores TRL's originals on exit.
  Nothing applies them at import, in the Airflow worker, or in a test that does not call them itself (a test
  checks that importing ``retrain.train.*`` leaves TRL untouched).
* **Per-model settings** (:func:`keep_4bit_trainable_on_cpu`): an attribute of the layers of one loaded model,
  needed for correct gradients; it changes nothing outside that model.

Each function's docstring names the upstream behaviour it works around and what the change measured. Every
patch checks that the private name it replaces still exists and does nothing otherwise, so a TRL release that
moves it costs speed or memory, never correctness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

# TRL 1.x: the fused LM head's tile width and its "score only labelled positions?" switch (trl/trainer/utils.py).
TRL_UTILS = "trl.trainer.utils"
TILE_ATTR = "_CHUNKED_LOGPROB_CHUNK_SIZE"
COMPACT_ATTR = "_use_triton"
CPU_TILE_COLUMNS = 4096
_MARK = "_retrain_compact_cpu"

Undo = Callable[[], None]


def _noop() -> None:
    return None


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes from switching 4-bit layers to its inference-only CPU format; returns layers changed.

    Upstream (bitsandbytes 0.50): on CPUs with AVX512-BF16, a Linear4bit repacks its weight for a fast bf16 kernel
    the first time it runs in eval mode without gradients -- which is exactly what the validation pass does. The
    repacked layer keeps using that kernel in training, and it has no autograd formula: gradients through the
    frozen base weights are then silently wrong (measured: 94% relative error in the LoRA gradients after one
    evaluation; tests/test_train.py::test_4bit_gradients_stay_correct_after_an_evaluation_pass), and compute
    drops to bf16. Keeping the standard dequantise-and-matmul path costs little.

    Scope: sets ``support_avx512bf16_for_cpu = False`` on this model's layers only (called by ``load_model``).
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def smaller_lm_head_tiles_on_cpu() -> Undo | None:
    """Score the vocabulary in 4,096-column tiles instead of TRL's 32,768; returns the undo (None: not applied).

    Upstream (TRL 1.16, ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = 32768``): without Triton, TRL's fused
    LM head runs each [tokens x 32,768] logits tile through a dozen full-size float32 temporaries; for SmolLM2
    at batch 8 that is ~1 GB of peak memory. Measured: 4,096 columns gave ~1 GB lower peak RSS (8.4 -> 6.8 GB
    per step) at the same speed. CUDA keeps TRL's tiles (its Triton kernel streams them): call this for CPU
    training only.

    Process-wide (a TRL module global): only the trainer process calls it, through :func:`cpu_speedups`.
    """
    import importlib

    trl_utils = importlib.import_module(TRL_UTILS)
    if not hasattr(trl_utils, TILE_ATTR):  # a private constant of TRL 1.x; skip if it moves
        return None
    original = getattr(trl_utils, TILE_ATTR)
    setattr(trl_utils, TILE_ATTR, CPU_TILE_COLUMNS)

    def undo() -> None:
        setattr(trl_utils, TILE_ATTR, original)

    return undo


def score_only_labelled_tokens_on_cpu() -> Undo | None:
    """Run TRL's fused LM head on the completion positions only on the CPU; returns the undo (None: not applied).

    Upstream (TRL 1.16, ``trl.trainer.utils._use_triton``): with completion-only loss, most positions of a batch
    (system prompt, user message, padding) carry no label. TRL scores just the labelled positions where Triton
    is available, but everywhere else it scores every position (to keep tile shapes fixed for compilers such as
    Neuron's) and masks the result -- on a CPU that is the LM head (49k x 576 for SmolLM2, ~20% of the model's
    FLOPs) forward and again in backward for tokens whose loss is thrown away. Eager CPU execution has nothing to
    recompile, so we take TRL's own compact path there. Measured: same losses to the last digit, ~25% shorter
    steps (a QLoRA step on SmolLM2 / product_intent 11.5 s -> 7.5-8 s; bench/train_throughput.py).

    Only trl.trainer.utils' own reference changes: the kernels keep choosing Triton or torch tiles by device.
    Process-wide (a TRL module global): only the trainer process calls it, through :func:`cpu_speedups`.
    """
    import importlib

    trl_utils = importlib.import_module(TRL_UTILS)
    original = getattr(trl_utils, COMPACT_ATTR, None)
    if original is None:  # moved in a TRL release: keep TRL's behaviour
        return None
    if getattr(original, _MARK, False):  # already applied (by an enclosing cpu_speedups)
        return _noop

    def use_compact(device) -> bool:
        return device.type == "cpu" or original(device)

    setattr(use_compact, _MARK, True)
    setattr(trl_utils, COMPACT_ATTR, use_compact)

    def undo() -> None:
        if getattr(trl_utils, COMPACT_ATTR, None) is use_compact:
            setattr(trl_utils, COMPACT_ATTR, original)

    return undo


@contextmanager
def cpu_speedups() -> Iterator[list[str]]:
    """Apply both TRL patches above for CPU training; restore TRL's originals on exit.

    Yields the names of the patches applied (empty when a TRL release moved what they replace). The trainer
    enters this around building and running the SFTTrainer when there is no CUDA device.
    """
    undo: list[tuple[str, Undo]] = []
    try:
        for name, patch in (("smaller_lm_head_tiles_on_cpu", smaller_lm_head_tiles_on_cpu),
                            ("score_only_labelled_tokens_on_cpu", score_only_labelled_tokens_on_cpu)):
            restore = patch()
            if restore is not None:
                undo.append((name, restore))
        yield [name for name, _ in undo]
    finally:
        for _, restore in reversed(undo):
            restore()
