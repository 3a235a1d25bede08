"""The QLoRA / LoRA trainer: ``python -m retrain.train.qlora.trainer --run-dir DIR [--resume auto]``.

Runs as its own process (launched by ``retrain.train.launch.train_qlora``) so that GPU memory is returned
when it exits, a crash cannot take the Airflow worker down, and ``accelerate launch`` can run it data-parallel.
It reads the prepared run directory (``run_config.json``, ``train.jsonl``, ``val.jsonl``) and writes
everything under ``run_dir/candidate/``:

    checkpoints/checkpoint-N/   resumable state (adapter, optimizer, scheduler, RNG, trainer state)
    adapter/                    LoRA adapter (safetensors) + tokenizer
    merged/                     base model with the adapter merged in (safetensors) + tokenizer, for serving
    tb/                         TensorBoard event files
    loss.png, model_card.md, Modelfile (Ollama), train_result.json (written last: its presence means done)

Progress goes to stdout one line at a time (the launcher copies it into the task log); warnings and
tracebacks go to stderr.

Recipe: TRL SFTTrainer on prompt/completion conversational examples (system + user = prompt, assistant =
completion), so the loss covers only the assistant's JSON; PEFT LoRA on every linear layer; for ``qlora`` the
frozen base is bitsandbytes nf4 with double quantisation. Compute dtype is bf16 on CUDA and float32 on CPU
(bf16 compute with an nf4 base diverged on CPU). Examples longer than ``max_length`` are dropped rather than
truncated, because a truncated completion teaches the model to emit broken JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CANDIDATE = "candidate"
RESULT_FILE = "train_result.json"
FINGERPRINT_FILE = "run_fingerprint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# --- small helpers (no heavy imports) ------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(message: str) -> None:
    """One progress line on stdout (main process only): the launcher streams these into the task log."""
    if _rank() == 0:
        print(message, flush=True)


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    # A directory cannot be os.replace'd over a non-empty one: move the old one aside first, so a crash leaves
    # either the old or the new artifact, never half of one.
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- data -----------------------------------------------------------------------------------------------


def to_prompt_completion(example: dict) -> dict:
    """A chat ``messages`` example as TRL's conversational prompt/completion pair.

    Everything before the final assistant turn is the prompt (system + user), the final assistant turn is the
    completion; SFTTrainer then masks the prompt tokens out of the loss (labels -100).
    """
    messages = example.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("example has no 'messages' list with at least a user and an assistant turn")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message must be the assistant's answer, got role {messages[-1].get('role')!r}")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def load_split(path: Path) -> list[dict]:
    """prompt/completion examples of one JSONL split; a broken line fails naming file and line."""
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(to_prompt_completion(json.loads(line)))
            except (json.JSONDecodeError, ValueError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}; rebuild the dataset (build_dataset) and retry") from None
    return rows


def example_length(tokenizer, example: dict) -> int:
    ids = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def drop_too_long(tokenizer, rows: list[dict], max_length: int) -> tuple[list[dict], int]:
    kept = [r for r in rows if example_length(tokenizer, r) <= max_length]
    return kept, len(rows) - len(kept)


# --- checkpoints ----------------------------------------------------------------------------------------


def is_complete_checkpoint(path: Path) -> bool:
    """True when the Trainer finished writing this checkpoint.

    transformers writes weights, then optimizer/scheduler/RNG, then ``trainer_state.json`` last; a SIGKILL
    in between leaves a directory without a parseable trainer state (or without the optimizer), which must not
    be resumed from.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    m = _CHECKPOINT.match(path.name)
    weights = any((path / f).is_file() for f in ("adapter_model.safetensors", "model.safetensors"))
    return bool(
        m
        and state.get("global_step") == int(m.group(1))
        and weights
        and (path / "optimizer.pt").is_file()
        and (path / "scheduler.pt").is_file()
        and any(path.glob("rng_state*.pth"))
    )


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    if not checkpoints.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def _prepare_checkpoint_dir(checkpoints: Path, fingerprint: dict, resume: str) -> Path | None:
    """The checkpoint to resume from (or None), after discarding checkpoints that belong to other settings."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    fp_path = checkpoints / FINGERPRINT_FILE
    previous = json.loads(fp_path.read_text()) if fp_path.is_file() else None
    stale = resume == "never" or (previous is not None and previous != fingerprint)
    if stale and any(checkpoints.glob("checkpoint-*")):
        why = "--resume never" if resume == "never" else f"settings changed ({_diff(previous, fingerprint)})"
        say(f"[train] discarding existing checkpoints: {why}")
        for p in checkpoints.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
    if _rank() == 0:
        _write_json(fp_path, fingerprint)
    if resume == "never":
        return None
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not is_complete_checkpoint(path):
            raise ValueError(f"--resume {resume} is not a complete checkpoint directory; use --resume auto")
        return path
    return latest_complete_checkpoint(checkpoints)


def _diff(a: dict | None, b: dict) -> str:
    a = a or {}
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) or "unknown"


# --- artifacts ------------------------------------------------------------------------------------------


def write_loss_plot(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """(Go TEMPLATE, stop tokens) for the tokenizer's chat template, or (None, []) when not recognised."""
    template = chat_template or ""
    if "<|im_start|>" in template:
        return _CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"]
    if "<|start_header_id|>" in template:  # Llama 3
        return (
            "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
            ["<|eot_id|>", "<|start_header_id|>"],
        )
    return None, []


def write_modelfile(path: Path, chat_template: str | None, system_prompt: str, max_length: int) -> None:
    template, stops = ollama_template(chat_template)
    system = system_prompt.replace('"""', '\\"\\"\\"')
    lines = [
        "# Ollama Modelfile for the fine-tuned candidate. From this directory:",
        "#   ollama create <name> -f Modelfile              (imports ./merged; add --quantize q4_K_M to shrink it)",
        "# llama.cpp servers need a GGUF file instead: python convert_hf_to_gguf.py merged --outfile model.gguf",
        "# (llama.cpp repository), then change FROM to ./model.gguf.",
        "FROM ./merged",
    ]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# TEMPLATE: the chat template is not ChatML or Llama 3; Ollama reads it from the tokenizer files.")
    lines.append(f'SYSTEM """{system}"""')
    lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER num_ctx {max(2048, max_length)}")
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    path.write_text("\n".join(lines) + "\n")


def write_model_card(path: Path, *, uc, result: dict, spec_dict: dict, manifest: dict | None, manifest_sha: str | None) -> None:
    counts = (manifest or {}).get("counts", {})
    files = (manifest or {}).get("files", {})

    def num(v, fmt="{:.4f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "n/a"

    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in spec_dict.items())
    data_rows = "\n".join(
        f"| {name} | {info.get('rows', 'n/a')} | `{info.get('sha256', 'n/a')}` |" for name, info in files.items()
    )
    text = f"""---
base_model: {result['base_model']}
library_name: peft
pipeline_tag: text-generation
tags: [retrain, {result['adapter']}, {uc.name}]
---

# {uc.name} candidate ({result['adapter'].upper()} fine-tune of `{result['base_model']}`)

{uc.description.strip()}

- **Base model**: `{result['base_model']}` (resolved to `{result['base_model_path']}`)
- **Method**: {result['adapter']} ({'4-bit ' + spec_dict.get('bnb_4bit_quant_type', 'nf4') + ' base' if result['quantized'] else 'full-precision base'}), compute dtype {result['compute_dtype']}, device {result['device']} x{result['processes']}
- **Loss**: on the assistant completion only (system prompt and user message are masked)
- **Run**: `{result['run_id']}`, {result['steps']} optimizer steps in {num(result['seconds'], '{:.0f}')} s{' (resumed from step ' + str(result['resumed_from_step']) + ')' if result.get('resumed_from_step') else ''}{', stopped early' if result.get('stopped_early') else ''}

## Data

Data manifest `manifest.json` sha256: `{manifest_sha or 'n/a'}`
Examples: train {counts.get('train', result['train_examples'])}, validation {counts.get('val', result['val_examples'])}, test {counts.get('test', 'n/a')}

| file | rows | sha256 |
|---|---|---|
{data_rows}

## Results

| metric | value |
|---|---|
| train loss (first logged) | {num(result.get('train_loss_first'))} |
| train loss (last logged) | {num(result.get('train_loss'))} |
| validation loss before training | {num(result.get('eval_loss_initial'))} |
| validation loss (best, kept) | {num(result.get('eval_loss'))} |
| tokens / second | {num(result.get('tokens_per_second'), '{:.0f}')} |

![loss curves](loss.png)

## Training configuration

| field | value |
|---|---|
{rows}

## Files

- `adapter/`: LoRA adapter (safetensors) and tokenizer; load with `PeftModel.from_pretrained(base, "adapter")`
- `merged/`: the base model with the adapter merged in (safetensors) and tokenizer, for serving
- `Modelfile`: `ollama create {uc.name} -f Modelfile`
- `tb/`: TensorBoard logs (`tensorboard --logdir tb`)
"""
    path.write_text(text)


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path, *, cuda: bool) -> None:
    """Merge the adapter into a full-precision copy of the base (never into the 4-bit weights) and save it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if cuda else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, device_map="auto" if cuda else None)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    _replace_dir(tmp, out_dir)
    del merged, base


# --- the trainer ----------------------------------------------------------------------------------------


class _Progress:
    """TrainerCallback printing one line per log/eval/save event: step, loss, tokens/s, ETA."""

    def __new__(cls, *args, **kwargs):
        # Subclass TrainerCallback lazily so importing this module stays light.
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
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
                        + f" elapsed {_fmt_seconds(time.time() - self.t0)}"
                        + (f" eta {_fmt_seconds(eta)}" if eta is not None else "")
                    )
                elif "eval_loss" in logs:
                    if isinstance(logs.get("eval_runtime"), (int, float)):
                        self.eval_seconds.append(float(logs["eval_runtime"]))
                    # The Trainer updates best_metric after this callback: include the loss just measured.
                    best = min(x for x in (state.best_metric, logs["eval_loss"]) if isinstance(x, float))
                    say(
                        f"[eval] step {state.global_step}/{state.max_steps} eval_loss {logs['eval_loss']:.4f}"
                        + (f" (best {best:.4f})" if isinstance(best, float) else "")
                        + (f" in {_fmt_seconds(self.eval_seconds[-1])}" if self.eval_seconds else "")
                    )

            def on_save(self, args, state, control, **kw):
                say(f"[save] checkpoint-{state.global_step}")

        return Progress(*args, **kwargs)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_model(base_path: str, spec, *, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=spec.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        # A 4-bit model cannot be moved after loading: place it on this process's device right away.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0")) if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if spec.quantized and not cuda:
        keep_4bit_trainable_on_cpu(model)
    if spec.quantized:
        from peft import prepare_model_for_kbit_training

        # Upcasts norms/embeddings to fp32 for stable QLoRA training and wires input grads for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_gc(spec, cuda))
    return model


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes from switching 4-bit layers to its inference-only CPU format; returns layers changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for a fast bf16 kernel the
    first time it runs in eval mode without gradients -- which is exactly what the validation pass does. The
    repacked layer keeps using that kernel in training, and it has no autograd formula: gradients through the
    frozen base weights are then silently wrong (measured: 94% relative error in the LoRA gradients after one
    evaluation), and compute drops to bf16. Keeping the standard dequantise-and-matmul path costs little.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def smaller_lm_head_tiles_on_cpu() -> None:
    """Score the vocabulary in 4,096-column tiles instead of TRL's 32,768 when training on the CPU.

    Without Triton, TRL's fused LM head runs each [tokens x 32,768] logits tile through a dozen full-size
    float32 temporaries; for SmolLM2 at batch 8 that is ~1 GB of peak memory. 4,096 columns measured ~1 GB lower
    peak RSS (8.4 -> 6.8 GB per step) at the same speed. CUDA keeps TRL's tiles (its Triton kernel streams them).
    """
    import trl.trainer.utils as trl_utils

    if hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):  # a private constant of TRL 1.x; skip if it moves
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 4096


def score_only_labelled_tokens_on_cpu() -> bool:
    """Run TRL's fused LM head on the completion positions only when training on the CPU; True if applied.

    With completion-only loss, most positions of a batch (system prompt, user message, padding) carry no label.
    TRL scores just the labelled positions where Triton is available, but everywhere else it scores every
    position (to keep tile shapes fixed for compilers such as Neuron's) and masks the result -- on a CPU that is
    the LM head (49k x 576 for SmolLM2, ~20% of the model's FLOPs) forward and again in backward for tokens whose
    loss is thrown away. Eager CPU execution has nothing to recompile, so we take TRL's own compact path there.
    Same losses to the last digit, ~25% shorter steps on SmolLM2 / product_intent (bench/train_throughput.py).
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "_retrain_compact_cpu", False):  # moved in a TRL release, or done
        return original is not None

    def use_compact(device) -> bool:
        return device.type == "cpu" or original(device)

    use_compact._retrain_compact_cpu = True
    # Only trl.trainer.utils' own reference changes: the kernels keep choosing Triton or torch tiles by device.
    trl_utils._use_triton = use_compact
    return True


def label_decision_points(tokenizer, uc, context: int = 3) -> list[tuple[list[int], list[int]]]:
    """Where the model picks a label: per label field, (the key's last tokens, the value's first-token ids).

    For ``"intent_type": "GIFT"`` vs ``"intent_type": "URGENT"`` the decision is the first token where the values
    diverge, right after ``…type": "``. Both are tokenised in the answer's own context (``"field": "value"``, as
    dataset.py writes it), so they are the ids the training data carries. The key tokens matter: the same ids
    occur elsewhere in an answer (``un`` of "unspecified" in a category, ``pre`` of "premium_quality" in a list),
    and weighting those taught the model to repeat them (measured: list items looping until the token budget).
    """
    points = []
    for path in uc.fields.labels:
        values = [v for v in (uc.schema_at(path) or {}).get("enum", []) if isinstance(v, str)]
        if len(values) < 2:
            continue
        key = path.rsplit(".", 1)[-1]
        seqs = [tokenizer(json.dumps({key: v}, ensure_ascii=False)[:-1], add_special_tokens=False)["input_ids"]
                for v in values]
        k = 0
        while all(len(q) > k for q in seqs) and len({q[k] for q in seqs}) == 1:
            k += 1
        if k == 0:
            continue
        # Skip the leading '{"' so the key matches wherever the field sits in the answer.
        tail = seqs[0][max(1, k - context):k] if k > 1 else seqs[0][:k]
        points.append((tail, sorted({q[k] for q in seqs if len(q) > k})))
    return points


def decision_mask(input_ids, points) -> Any:
    """Bool tensor like ``input_ids``: True where the token is a label decision (see label_decision_points)."""
    import torch

    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for tail, ids in points:
        m = len(tail)
        if input_ids.shape[1] <= m:
            continue
        tail_t = torch.tensor(tail, device=input_ids.device)
        windows = input_ids.unfold(1, m, 1)  # windows[:, s] = input_ids[:, s:s+m]
        after_key = (windows[:, :-1] == tail_t).all(-1)  # the key ends right before position s+m
        is_value = torch.isin(input_ids[:, m:], torch.tensor(ids, device=input_ids.device))
        mask[:, m:] |= after_key & is_value
    return mask


def weighted_trainer_class():
    """SFTTrainer whose *training* loss counts the label decision tokens more; evaluation loss is the plain one.

    Why: in a structured answer the label is one token among ~60 (braces, keys, entities, tags), so the
    averaged loss spends almost all of its gradient on format and copying, and the label -- the token the gate
    scores -- is learnt last (on SmolLM2 / product_intent, intent accuracy stayed near the majority class for
    the first epoch while validation loss fell 2.9 -> 0.3). Weighting the decision tokens makes each step count
    for them. Weights are renormalised to mean 1 over the labelled tokens of each batch, so the loss scale (and
    gradient clipping) is unchanged. Works with TRL's fused LM head: its per-token log-probabilities are scaled
    before TRL sums them.
    """
    from trl import SFTTrainer

    class _Reweighted:
        def __init__(self, model, weight, points, inputs):
            self._model, self._weight, self._points, self._inputs = model, weight, points, inputs

        def __getattr__(self, name):
            return getattr(self._model, name)

        def __call__(self, *args, **kwargs):
            out = self._model(*args, **kwargs)
            log_probs = getattr(out, "log_probs", None)
            shift = self._inputs.get("shift_labels")
            labels = shift if shift is not None else self._inputs.get("labels")
            input_ids = self._inputs.get("input_ids")
            if log_probs is None or labels is None or input_ids is None:
                return out
            decisions = decision_mask(input_ids, self._points)
            if log_probs.shape[1] == labels.shape[1] - 1:  # log_probs[:, i] scores token i + 1
                labels, decisions = labels[:, 1:], decisions[:, 1:]
            valid = labels != -100
            w = (1.0 + (self._weight - 1.0) * (decisions & valid).to(log_probs.dtype)) * valid
            w = w * (valid.sum() / w.sum().clamp(min=1e-6))
            out.log_probs = log_probs * w
            return out

    class WeightedSFTTrainer(SFTTrainer):
        label_weighting = None  # (weight, label_decision_points), set by build_trainer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.label_weighting is not None and self.model.training:
                model = _Reweighted(model, *self.label_weighting, inputs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return WeightedSFTTrainer


def _gc(spec, cuda: bool) -> bool:
    return cuda if spec.gradient_checkpointing is None else spec.gradient_checkpointing


def lora_config(spec, model=None):
    """PEFT LoraConfig for the spec; ``model`` (the loaded base) is needed only for ``lora_top_layers``."""
    from peft import LoraConfig

    layers, targets = None, spec.target_modules
    if spec.lora_top_layers:
        num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if not num_layers:
            raise ValueError("lora_top_layers needs the loaded base model (its config.num_hidden_layers)")
        if spec.lora_top_layers > num_layers:
            raise ValueError(
                f"lora_top_layers is {spec.lora_top_layers} but the base model has {num_layers} layers; "
                f"set it to at most {num_layers} or to null (every layer)"
            )
        layers = list(range(num_layers - spec.lora_top_layers, num_layers))
        if targets == "all-linear":  # PEFT accepts layers_to_transform only with explicit module names
            targets = linear_module_names(model)
    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def linear_module_names(model) -> list[str]:
    """What 'all-linear' means for this model: the names of its linear layers inside the decoder layers."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name  # bnb's Linear4bit is an nn.Linear too
    }
    return sorted(names)


def sft_config(spec, output_dir: Path, *, cuda: bool, has_eval: bool, eval_on_start: bool):
    from trl import SFTConfig

    padding_free_only = spec.padding_free and not spec.packing
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.eval_batch_size or spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        num_train_epochs=spec.epochs,
        # Too-long examples are dropped beforehand; padding-free without packing refuses a max_length.
        max_length=None if padding_free_only else spec.max_length,
        packing=spec.packing,
        padding_free=spec.padding_free,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if spec.group_by_length and not spec.packing else "random",
        activation_checkpointing=_gc(spec, cuda),  # the new name of gradient_checkpointing (transformers 5)
        bf16=cuda,
        use_cpu=not cuda,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=spec.eval_steps,
        eval_on_start=eval_on_start,
        save_strategy="steps",
        save_steps=spec.save_steps,
        save_total_limit=spec.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        restore_callback_states_from_checkpoint=True,  # early-stopping patience survives a resume
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        report_to=["tensorboard"],
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
        ddp_find_unused_parameters=False,  # every LoRA parameter gets a gradient
        dataloader_num_workers=0,
    )


def build_trainer(
    spec,
    base_path: str,
    train_rows: list[dict],
    val_rows: list[dict],
    output_dir: Path,
    *,
    cuda: bool | None = None,
    eval_on_start: bool = False,
    callbacks: list | None = None,
    label_points: list | None = None,
):
    """An SFTTrainer with the tokenised datasets ready (also used by the tests to inspect labels)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, EarlyStoppingCallback
    from trl import SFTTrainer

    cuda = _cuda() if cuda is None else cuda
    if not cuda:
        smaller_lm_head_tiles_on_cpu()
        score_only_labelled_tokens_on_cpu()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(base_path, spec, cuda=cuda)
    has_eval = bool(val_rows)
    args = sft_config(spec, output_dir, cuda=cuda, has_eval=has_eval, eval_on_start=eval_on_start and has_eval)
    cbs = list(callbacks or [])
    if has_eval and spec.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(spec.early_stopping_patience, spec.early_stopping_threshold))
    weighted = spec.label_token_weight > 1 and bool(label_points)
    trainer_cls = weighted_trainer_class() if weighted else SFTTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(spec, model),
        callbacks=cbs,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw log dicts; the Progress callback prints readable lines
    if weighted:
        trainer.label_weighting = (spec.label_token_weight, label_points)
    if spec.quantized and not cuda:
        # TRL casts the adapter of a quantized model to bf16 (the GPU recipe); bf16 updates on CPU did not
        # learn here, so keep the trainable weights in float32.
        import torch

        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.float32)
    # Epochs with an optional step cap: transformers' max_steps would otherwise replace the epochs entirely.
    n = len(trainer.train_dataset)
    per_epoch = max(1, math.ceil(math.ceil(n / (spec.batch_size * args.world_size)) / spec.grad_accum))
    total = max(1, math.ceil(spec.epochs * per_epoch))
    trainer.args.max_steps = min(total, spec.max_steps) if spec.max_steps else total
    return trainer


def train(run_dir: str | Path, *, resume: str = "auto", overrides: dict | None = None) -> dict:
    """Train the candidate for a prepared run directory; returns what is written to train_result.json."""
    started = time.time()
    from retrain.evaluate.models import resolve_base_model
    from retrain.rundir import load_run
    from retrain.train.spec import compute_dtype_name, run_fingerprint, spec_for_run

    run_dir = Path(run_dir).resolve()
    uc, meta = load_run(run_dir)
    spec = spec_for_run(run_dir, overrides)
    out = run_dir / CANDIDATE
    checkpoints = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    if _rank() == 0:
        (out / RESULT_FILE).unlink(missing_ok=True)  # a stale result must not outlive a failed retrain

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()  # weight-loading bars would flood the task log through stderr
    # bitsandbytes warns at import that an optional CPU kernel for its inference-only 4-bit format is missing;
    # training never uses that format (see keep_4bit_trainable_on_cpu).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import warnings

    # PEFT/TRL still read the pre-v5 attribute name on every model wrap: noise, not a problem of this run.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a TRL dependency
        pass
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    cuda = torch.cuda.is_available()
    base_path = resolve_base_model(uc.training.base_model)

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_rows, dropped_train = drop_too_long(tokenizer, load_split(run_dir / "train.jsonl"), spec.max_length)
    val_rows, dropped_val = drop_too_long(tokenizer, load_split(run_dir / "val.jsonl"), spec.max_length)
    if dropped_train or dropped_val:
        say(f"[data] dropped {dropped_train} train / {dropped_val} val examples longer than max_length "
            f"{spec.max_length} tokens (raise max_length to keep them)")
    if not train_rows:
        raise ValueError(f"{run_dir / 'train.jsonl'} has no usable examples; build the dataset first")
    if not val_rows:
        say("[data] no validation examples: no evaluation, no early stopping, the last step is kept")

    fingerprint = run_fingerprint(run_dir, spec, uc.training.base_model)
    resume_from = _prepare_checkpoint_dir(checkpoints, fingerprint, resume)
    progress = _Progress()
    label_points = label_decision_points(tokenizer, uc) if spec.label_token_weight > 1 else None
    trainer = build_trainer(
        spec, base_path, train_rows, val_rows, checkpoints,
        cuda=cuda, eval_on_start=resume_from is None, callbacks=[progress], label_points=label_points,
    )
    resumed_step = int(_CHECKPOINT.match(resume_from.name).group(1)) if resume_from else None
    world = trainer.args.world_size
    say(
        f"[train] {uc.name}: {spec.adapter} on {uc.training.base_model} ({'cuda' if cuda else 'cpu'} x{world}, "
        f"{compute_dtype_name(cuda)}), {len(train_rows)} train / {len(val_rows)} val examples, "
        f"{trainer.args.max_steps} steps, lr {spec.learning_rate:g}, batch {spec.batch_size}x{spec.grad_accum}"
        + (f"; resuming from {resume_from.name} (step {resumed_step})" if resume_from else "")
    )
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state

    adapter_dir = out / "adapter"
    tmp_adapter = out / "adapter.tmp"
    trainer.save_model(str(tmp_adapter))  # the best checkpoint's adapter when validation ran
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
    if _rank() != 0:
        return {}
    _replace_dir(tmp_adapter, adapter_dir)
    history = list(state.log_history)
    stopped_early = state.global_step < trainer.args.max_steps
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    del trainer
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    say("[merge] merging the adapter into a full-precision copy of the base model")
    merged_dir = out / "merged"
    merge_adapter(base_path, adapter_dir, merged_dir, cuda=cuda)
    if cuda:
        torch.cuda.empty_cache()

    write_loss_plot(history, out / "loss.png")
    write_modelfile(out / "Modelfile", tokenizer.chat_template, uc.system_prompt, spec.max_length)
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    rates = progress.tokens_per_second
    result = {
        "backend": "qlora",
        "adapter": spec.adapter,
        "quantized": spec.quantized,
        "base_model": uc.training.base_model,
        "base_model_path": base_path,
        "adapter_path": str(adapter_dir),
        "merged_path": str(merged_dir),
        "model_spec": {"kind": "hf", "path": str(merged_dir), "label": "candidate"},
        "model_id": None,
        "job_id": None,
        "run_id": meta.get("run_id"),
        "train_loss": train_losses[-1] if train_losses else None,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_mean": output.training_loss,
        "eval_loss": state.best_metric if state.best_metric is not None else (eval_losses[-1][1] if eval_losses else None),
        "eval_loss_initial": eval_losses[0][1] if eval_losses and eval_losses[0][0] == 0 else None,
        "eval_loss_last": eval_losses[-1][1] if eval_losses else None,
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(state.epoch or 0.0, 3),
        "stopped_early": stopped_early,
        "resumed_from_step": resumed_step,
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
        "dropped_too_long": dropped_train + dropped_val,
        "tokens_per_second": round(sum(rates) / len(rates), 1) if rates else None,
        "train_runtime": round(output.metrics.get("train_runtime", 0.0), 1),
        "seconds": None,  # filled below, after the last artifact
        "device": "cuda" if cuda else "cpu",
        "processes": world,
        "compute_dtype": compute_dtype_name(cuda),
        "spec": spec.model_dump(mode="json"),
        "spec_fingerprint": spec.fingerprint(),
        "fingerprint": fingerprint,
        "manifest_sha256": _sha256(manifest_path) if manifest else None,
        "model_card": str(out / "model_card.md"),
        "modelfile": str(out / "Modelfile"),
        "loss_plot": str(out / "loss.png"),
        "tensorboard_dir": str(out / "tb"),
        "checkpoints_dir": str(checkpoints),
    }
    result["seconds"] = round(time.time() - started, 1)
    write_model_card(out / "model_card.md", uc=uc, result=result, spec_dict=result["spec"],
                     manifest=manifest, manifest_sha=result["manifest_sha256"])
    _write_json(out / RESULT_FILE, result)
    say(
        f"[done] {result['steps']} steps in {_fmt_seconds(result['seconds'])}; train loss "
        f"{result['train_loss_first']:.4f} -> {result['train_loss']:.4f}"
        + (f"; eval loss {result['eval_loss_initial']:.4f} -> {result['eval_loss']:.4f}"
           if result["eval_loss_initial"] is not None and result["eval_loss"] is not None else "")
        + f"; merged model in {merged_dir}"
    )
    return result


def _die_with_parent() -> None:
    # If the launching worker is killed outright (OOM killer, SIGKILL), get SIGTERM instead of living on as
    # an orphan that holds the GPU. Set here rather than in a Popen preexec_fn, which is unsafe in a threaded
    # parent such as an Airflow worker. Linux only.
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain.train.qlora.trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="prepared run directory (run_config.json, train/val.jsonl)")
    parser.add_argument(
        "--resume", default="auto",
        help="'auto' (newest complete checkpoint, default), 'never' (discard checkpoints), or a checkpoint path",
    )
    parser.add_argument("--overrides", default=None, help="JSON object of TrainingSpec fields (highest precedence)")
    args = parser.parse_args(argv)
    _die_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    overrides = json.loads(args.overrides) if args.overrides else None
    try:
        train(args.run_dir, resume=args.resume, overrides=overrides)
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
