"""What the trainer leaves next to the adapter: loss plot, Ollama Modelfile, model card, merged model.

Every function here writes one artifact of ``run_dir/candidate/`` (names from ``retrain.rundir.RunDir``); the
trainer calls them after training, on the main process only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from retrain.rundir import RunDir


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished directory into place.

    A directory cannot be os.replace'd over a non-empty one: move the old one aside first, so a crash leaves
    either the old or the new artifact, never half of one.
    """
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


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


def write_modelfile(run: RunDir, chat_template: str | None, system_prompt: str, max_length: int) -> None:
    """``candidate/Modelfile``: ``ollama create`` imports the merged model with the chat template and system prompt."""
    merged = run.merged.relative_to(run.modelfile.parent)
    template, stops = ollama_template(chat_template)
    system = system_prompt.replace('"""', '\\"\\"\\"')
    lines = [
        "# Ollama Modelfile for the fine-tuned candidate. From this directory:",
        f"#   ollama create <name> -f {run.modelfile.name}              (imports ./{merged}; add --quantize q4_K_M "
        "to shrink it)",
        f"# llama.cpp servers need a GGUF file instead: python convert_hf_to_gguf.py {merged} --outfile model.gguf",
        "# (llama.cpp repository), then change FROM to ./model.gguf.",
        f"FROM ./{merged}",
    ]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# TEMPLATE: the chat template is not ChatML or Llama 3; Ollama reads it from the tokenizer files.")
    lines.append(f'SYSTEM """{system}"""')
    lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER num_ctx {max(2048, max_length)}")
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    run.modelfile.write_text("\n".join(lines) + "\n")


def write_model_card(run: RunDir, *, uc, result: dict, spec_dict: dict, manifest: dict | None,
                     manifest_sha: str | None) -> None:
    """``candidate/model_card.md``: Hugging Face card front matter, data hashes, results, configuration, files."""
    here = run.model_card.parent
    loss_plot, adapter, merged, modelfile, tb = (p.relative_to(here) for p in (
        run.loss_plot, run.adapter, run.merged, run.modelfile, run.tensorboard))
    manifest_name = run.manifest.name
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

Data manifest `{manifest_name}` sha256: `{manifest_sha or 'n/a'}`
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

![loss curves]({loss_plot})

## Training configuration

| field | value |
|---|---|
{rows}

## Files

- `{adapter}/`: LoRA adapter (safetensors) and tokenizer; load with `PeftModel.from_pretrained(base, "{adapter}")`
- `{merged}/`: the base model with the adapter merged in (safetensors) and tokenizer, for serving
- `{modelfile}`: `ollama create {uc.name} -f {modelfile}`
- `{tb}/`: TensorBoard logs (`tensorboard --logdir {tb}`)
"""
    run.model_card.write_text(text)


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
    replace_dir(tmp, out_dir)
    del merged, base
