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

This module is the entry point (``main`` / ``train``) and the TRL/PEFT configuration. The rest of the trainer:
``data`` (splits as prompt/completion pairs), ``checkpoints`` (resume), ``weighting`` (label-token weighting),
``cpu`` (CPU fixes that reach into TRL and bitsandbytes internals: ``train`` alone applies the process-wide ones,
scoped to this process), ``artifacts`` (loss plot, Modelfile, model card, merge) and ``progress`` (stdout lines).

Recipe: TRL SFTTrainer on prompt/completion conversational examples (system + user = prompt, assistant =
completion), so the loss covers only the assistant's JSON; PEFT LoRA on every linear layer; for ``qlora`` the
frozen base is bitsandbytes nf4 with double quantisation. Compute dtype is bf16 on CUDA and float32 on CPU
(bf16 compute with an nf4 base diverged on CPU). Examples longer than ``max_length`` are dropped rather than
truncated, because a truncated completion teaches the model to emit broken JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from retrain import settings
from retrain.rundir import RunDir, sha256_file, write_json
from retrain.train.qlora.artifacts import merge_adapter, replace_dir, write_loss_plot, write_model_card, write_modelfile
from retrain.train.qlora.checkpoints import checkpoint_step, prepare_checkpoint_dir
from retrain.train.qlora.cpu import cpu_speedups, keep_4bit_trainable_on_cpu
from retrain.train.qlora.data import drop_too_long, load_split
from retrain.train.qlora.progress import Progress, fmt_seconds, is_main_process, say
from retrain.train.qlora.weighting import label_decision_points, weighted_trainer_class

# --- model and TRL/PEFT configuration ---------------------------------------------------------------------


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
        kwargs["device_map"] = {"": settings.local_rank() if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if spec.quantized and not cuda:
        keep_4bit_trainable_on_cpu(model)
    if spec.quantized:
        from peft import prepare_model_for_kbit_training

        # Upcasts norms/embeddings to fp32 for stable QLoRA training and wires input grads for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_gc(spec, cuda))
    return model


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
    """An SFTTrainer with the tokenised datasets ready (also used by the tests to inspect labels).

    Patches nothing outside the objects it creates: ``train`` enters ``cpu.cpu_speedups`` around it on a CPU.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer, EarlyStoppingCallback
    from trl import SFTTrainer

    cuda = _cuda() if cuda is None else cuda
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(base_path, spec, cuda=cuda)
    has_eval = bool(val_rows)
    args = sft_config(spec, output_dir, cuda=cuda, has_eval=has_eval, eval_on_start=eval_on_start and has_eval)
    cbs = list(callbacks or [])
    if has_eval and spec.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(spec.early_stopping_patience, spec.early_stopping_threshold))
    if getattr(spec, "stop_at_step", None):  # a sweep's first rung (retrain.train.qlora.stop)
        from retrain.train.qlora.stop import stop_at_step_callback

        cbs.append(stop_at_step_callback(spec.stop_at_step))
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


# --- the trainer process ---------------------------------------------------------------------------------


def quiet_library_output() -> None:
    """Process-wide logging settings of the trainer process (called by ``train`` only): readable task logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()  # weight-loading bars would flood the task log through stderr
    # bitsandbytes warns at import that an optional CPU kernel for its inference-only 4-bit format is missing;
    # training never uses that format (see cpu.keep_4bit_trainable_on_cpu).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import warnings

    # PEFT/TRL still read the pre-v5 attribute name on every model wrap: noise, not a problem of this run.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a TRL dependency
        pass


def train(run_dir: str | Path, *, resume: str = "auto", overrides: dict | None = None) -> dict:
    """Train the candidate for a prepared run directory; returns what is written to train_result.json.

    The trainer process's entry point (``main``): it alone applies the process-wide CPU patches of TRL
    (``cpu.cpu_speedups``, undone when training ends) and the library logging settings.
    """
    started = time.time()
    from retrain.evaluate.models import resolve_base_model
    from retrain.train.spec import compute_dtype_name, run_fingerprint, spec_for_run

    run = RunDir(Path(run_dir).resolve())
    uc, meta = run.load()
    spec = spec_for_run(run.path, overrides)
    run.candidate.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        run.train_result.unlink(missing_ok=True)  # a stale result must not outlive a failed retrain

    import torch
    from transformers import AutoTokenizer

    quiet_library_output()
    settings.export("TENSORBOARD_LOGGING_DIR", str(run.tensorboard))
    cuda = torch.cuda.is_available()
    base_path = resolve_base_model(uc.training.base_model)

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_rows, dropped_train = drop_too_long(tokenizer, load_split(run.split("train")), spec.max_length)
    val_rows, dropped_val = drop_too_long(tokenizer, load_split(run.split("val")), spec.max_length)
    if dropped_train or dropped_val:
        say(f"[data] dropped {dropped_train} train / {dropped_val} val examples longer than max_length "
            f"{spec.max_length} tokens (raise max_length to keep them)")
    if not train_rows:
        raise ValueError(f"{run.split('train')} has no usable examples; build the dataset first")
    if not val_rows:
        say("[data] no validation examples: no evaluation, no early stopping, the last step is kept")

    fingerprint = run_fingerprint(run.path, spec, uc.training.base_model)
    resume_from = prepare_checkpoint_dir(run.checkpoints, run.fingerprint, fingerprint, resume)
    progress = Progress()
    label_points = label_decision_points(tokenizer, uc) if spec.label_token_weight > 1 else None
    adapter_dir = run.adapter
    tmp_adapter = adapter_dir.with_name(adapter_dir.name + ".tmp")
    # Process-wide patches of TRL internals for CPU training (retrain.train.qlora.cpu), undone on exit.
    with nullcontext([]) if cuda else cpu_speedups() as applied:
        if applied:
            say(f"[train] cpu speed-ups: {', '.join(applied)}")
        trainer = build_trainer(
            spec, base_path, train_rows, val_rows, run.checkpoints,
            cuda=cuda, eval_on_start=resume_from is None, callbacks=[progress], label_points=label_points,
        )
        resumed_step = checkpoint_step(resume_from) if resume_from else None
        world = trainer.args.world_size
        say(
            f"[train] {uc.name}: {spec.adapter} on {uc.training.base_model} ({'cuda' if cuda else 'cpu'} x{world}, "
            f"{compute_dtype_name(cuda)}), {len(train_rows)} train / {len(val_rows)} val examples, "
            f"{trainer.args.max_steps} steps, lr {spec.learning_rate:g}, batch {spec.batch_size}x{spec.grad_accum}"
            + (f"; resuming from {resume_from.name} (step {resumed_step})" if resume_from else "")
        )
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state

    trainer.save_model(str(tmp_adapter))  # the best checkpoint's adapter when validation ran
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return {}
    replace_dir(tmp_adapter, adapter_dir)
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
    merged_dir = run.merged
    merge_adapter(base_path, adapter_dir, merged_dir, cuda=cuda)
    if cuda:
        torch.cuda.empty_cache()

    write_loss_plot(history, run.loss_plot)
    write_modelfile(run, tokenizer.chat_template, uc.system_prompt, spec.max_length)
    manifest = json.loads(run.manifest.read_text()) if run.manifest.is_file() else None
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
        "manifest_sha256": sha256_file(run.manifest) if manifest else None,
        "model_card": str(run.model_card),
        "modelfile": str(run.modelfile),
        "loss_plot": str(run.loss_plot),
        "tensorboard_dir": str(run.tensorboard),
        "checkpoints_dir": str(run.checkpoints),
    }
    result["seconds"] = round(time.time() - started, 1)
    write_model_card(run, uc=uc, result=result, spec_dict=result["spec"],
                     manifest=manifest, manifest_sha=result["manifest_sha256"])
    write_json(run.train_result, result)
    say(
        f"[done] {result['steps']} steps in {fmt_seconds(result['seconds'])}; train loss "
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
    settings.export("TOKENIZERS_PARALLELISM", "false", only_if_unset=True)
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
