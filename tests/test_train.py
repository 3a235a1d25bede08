"""QLoRA/LoRA training backend: spec validation, completion-only labels, the launcher, artifacts, resume.

The default tests train a tiny random Llama (2 layers, 64 wide) with a small BPE tokenizer that carries the
same ChatML chat template as SmolLM2, so every code path of the real trainer runs in seconds. The slow tests
train the real SmolLM2-135M-Instruct (QLoRA, nf4) on a product_intent dataset built by the real pipeline and
run the trainer data-parallel in two CPU processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from retrain.schemas.run_params import apply_params, parse_run_params
from retrain.schemas.use_case import load_use_case
from retrain.schemas.training import TrainingSpecError, parse_spec, spec_from_use_case
from retrain.train.spec import spec_for_run

UC = load_use_case("product_intent")
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LAUNCH_LOGGER = "retrain.train.launch"


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request, monkeypatch):
    # A 64-wide model gains nothing from a second thread, and on a busy CI box two OpenMP threads per process
    # made each tiny step ~10x slower (0.4 s -> 4 s). The trainer subprocess inherits the variable.
    if "db_conn" not in request.fixturenames:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _examples(n: int, seed: int) -> list[dict]:
    """Chat examples in the run-directory contract, from the synthetic product_intent traffic."""
    from retrain.data.synthetic import generate_rows

    out = []
    for r in generate_rows(UC, n, seed=seed, dirty=0.0):
        label = r["corrected_output"] or r["model_output"]
        if r["feedback"] == "rejected" or not isinstance(label, dict):
            continue
        out.append({"messages": [
            {"role": "system", "content": UC.system_prompt},
            {"role": "user", "content": UC.render_input(r["input"])},
            {"role": "assistant", "content": json.dumps(label, ensure_ascii=False)},
        ]})
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama + a 600-token BPE tokenizer with SmolLM2's ChatML template, saved like a HF model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    texts = [m["content"] for ex in _examples(300, seed=99) for m in ex["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf_tok.chat_template = CHATML
    hf_tok.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_run_dir(run_dir: Path, base_model: str, *, n: int = 160, seed: int = 5) -> Path:
    """A prepared run directory as build_dataset leaves it (run_config.json, train/val.jsonl, manifest.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    uc = apply_params(UC, parse_run_params({"base_model": base_model}))
    (run_dir / "run_config.json").write_text(json.dumps(
        {"run_id": "manual__test", "params": {}, "use_case": uc.model_dump(mode="json")}))
    rows = _examples(n, seed)
    cut = int(len(rows) * 0.85)
    files = {}
    for name, part in (("train.jsonl", rows[:cut]), ("val.jsonl", rows[cut:])):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode()
        (run_dir / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": len(part)}
    (run_dir / "manifest.json").write_text(json.dumps({
        "use_case": uc.name, "run_id": "manual__test", "files": files,
        "counts": {"train": cut, "val": len(rows) - cut, "test": 0},
    }))
    return run_dir


# A few fast optimiser steps; eval/save often enough that every code path (early-stopping bookkeeping,
# checkpoint rotation, best-model reload) runs.
# lora_top_layers: the product_intent YAML adapts the top 15 of SmolLM2's 30 layers; the tiny Llama has 2.
FAST = {"max_steps": 8, "eval_steps": 4, "save_steps": 4, "logging_steps": 1, "batch_size": 4,
        "learning_rate": 3e-3, "warmup_ratio": 0.0, "lora_top_layers": None}


def launch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LAUNCH_LOGGER]


def trl_patch_points() -> dict[str, int]:
    """Identity of the TRL module globals the trainer process patches on a CPU (retrain.train.qlora.cpu)."""
    import trl.trainer.utils as trl_utils

    return {name: id(getattr(trl_utils, name, None)) for name in ("_use_triton", "_CHUNKED_LOGPROB_CHUNK_SIZE")}


# --- spec -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"adapter": "qlora", "load_in_4bit": False}, "adapter 'qlora' requires load_in_4bit: true"),
        ({"adapter": "lora", "load_in_4bit": True}, "set load_in_4bit: false"),
        ({"lora_rank": 8}, "lora_rank: unknown field"),
        ({"lora_r": 0}, "lora_r: Input should be greater than or equal to 1"),
        ({"learning_rate": 2}, "learning_rate: Input should be less than 1"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules: Value error, lm_head cannot carry an adapter"),
        ({"eval_steps": 20, "save_steps": 30}, "save_steps (30) must be a multiple of eval_steps (20)"),
        ({"batch_size": "eight"}, "batch_size: Input should be a valid integer"),
    ],
)
def test_spec_errors_name_the_field(data, expected):
    with pytest.raises(TrainingSpecError) as err:
        parse_spec(data)
    assert expected in str(err.value), str(err.value)


def test_spec_follows_the_use_case_and_overrides_in_order(tmp_path):
    spec = spec_from_use_case(UC.training)
    assert (spec.adapter, spec.quantized, spec.max_length, spec.batch_size) == ("qlora", True, 256, 8)
    assert spec.learning_rate == UC.training.learning_rate

    # Switching a qlora use case (load_in_4bit: true in its YAML) to lora must not keep the 4-bit base.
    assert spec_from_use_case(UC.training, {"adapter": "lora"}).quantized is False
    assert spec_from_use_case(UC.training.model_copy(update={"adapter": "lora", "load_in_4bit": None})).quantized \
        is False

    run_dir = make_run_dir(tmp_path / "run", "smollm2-135m-instruct", n=20)
    (run_dir / "train_overrides.json").write_text(json.dumps({"lora_r": 4, "max_steps": 10}))
    spec = spec_for_run(run_dir, {"max_steps": 3})
    assert (spec.lora_r, spec.max_steps) == (4, 3)  # extra_overrides win over the file, the file over the YAML
    (run_dir / "train_overrides.json").write_text("{not json")
    with pytest.raises(TrainingSpecError, match="train_overrides.json is not valid JSON"):
        spec_for_run(run_dir)


def test_the_use_case_yaml_and_the_trigger_params_set_every_training_field():
    from retrain.schemas.run_params import apply_params, parse_run_params
    from retrain.schemas.use_case import ConfigError, parse_use_case

    data = UC.model_dump(mode="json")
    data["training"].update({"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                             "grad_accum": 2, "gradient_checkpointing": True, "eval_steps": 10, "save_steps": 10})
    uc = parse_use_case(data)
    spec = spec_from_use_case(uc.training)
    assert (spec.lora_r, spec.lora_alpha, spec.target_modules, spec.grad_accum) == (8, 16, ["q_proj", "v_proj"], 2)

    params = parse_run_params({"adapter": "lora", "max_train_steps": 7,
                               "training_overrides": {"lora_r": 32, "learning_rate": 5e-4}})
    spec = spec_from_use_case(apply_params(uc, params).training)
    assert (spec.adapter, spec.quantized, spec.max_steps, spec.lora_r, spec.learning_rate) == \
        ("lora", False, 7, 32, 5e-4)

    # A typo or a broken cross-field rule fails prepare_run with the field's name, before anything trains.
    data["training"]["lora_rank"] = 8
    with pytest.raises(ConfigError, match="training.lora_rank: unknown field"):
        parse_use_case(data)
    with pytest.raises(ConfigError, match="save_steps .* must be a multiple of eval_steps"):
        apply_params(uc, parse_run_params({"training_overrides": {"save_steps": 15}}))
    with pytest.raises(ConfigError, match="adapter 'qlora' requires load_in_4bit"):
        apply_params(uc, parse_run_params({"training_overrides": {"load_in_4bit": False}}))


def test_launcher_rejects_a_bad_override_before_starting_anything(tmp_path):
    from retrain.train.launch import train_qlora

    run_dir = make_run_dir(tmp_path / "run", "smollm2-135m-instruct", n=20)
    started = time.monotonic()
    with pytest.raises(TrainingSpecError, match="lora_alpa: unknown field"):
        train_qlora(str(run_dir), extra_overrides={"lora_alpa": 16})
    assert time.monotonic() - started < 5 and not (run_dir / "candidate").exists()


def test_multi_process_command_uses_torchrun_through_accelerate(tmp_path, monkeypatch):
    from retrain.train.launch import trainer_command

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("RETRAIN_TRAIN_PROCESSES", raising=False)
    cmd, n = trainer_command(tmp_path, None)
    assert n == 1 and cmd[1:3] == ["-m", "retrain.train.qlora.trainer"]
    monkeypatch.setenv("RETRAIN_TRAIN_PROCESSES", "2")
    cmd, n = trainer_command(tmp_path, {"max_steps": 3})
    assert n == 2 and cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[-2:] == ["--overrides", '{"max_steps": 3}']
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv("RETRAIN_TRAIN_PROCESSES")
    assert trainer_command(tmp_path, None)[1] == 4


# --- data and labels ------------------------------------------------------------------------------------


def test_prompt_is_masked_and_only_the_assistant_json_is_trained(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from retrain.train.qlora import trainer as qlora
    from retrain.train.qlora.data import load_split

    run_dir = make_run_dir(tmp_path / "run", str(tiny_model), n=30)
    rows = load_split(run_dir / "train.jsonl")
    assert rows[0]["prompt"][0]["role"] == "system" and rows[0]["completion"][0]["role"] == "assistant"
    spec = parse_spec({"adapter": "lora", "max_length": 512})
    before = trl_patch_points()
    trainer = qlora.build_trainer(spec, str(tiny_model), rows[:8], rows[8:10], tmp_path / "ckpt", cuda=False)
    assert trl_patch_points() == before, "build_trainer must not patch TRL (only the trainer process does)"
    tok = AutoTokenizer.from_pretrained(tiny_model)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])  # the collator training uses
    for i in range(4):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        real = batch["attention_mask"][i].tolist()
        prompt_ids = tok.apply_chat_template(rows[i]["prompt"], add_generation_prompt=True, tokenize=True)
        prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
        n_prompt = len(prompt_ids)
        assert ids[:n_prompt] == prompt_ids
        assert all(lab == -100 for lab in labels[:n_prompt]), "system/user tokens must not be trained"
        trained = [t for t, lab, m in zip(ids, labels, real) if lab != -100 and m]
        assert trained == [lab for lab, m in zip(labels, real) if lab != -100 and m]
        # The trained tokens are exactly the assistant's JSON and its end-of-turn token.
        assert tok.decode(trained).strip() == rows[i]["completion"][0]["content"] + "<|im_end|>"
        assert all(lab == -100 for lab, m in zip(labels, real) if not m), "padding must not be trained"


def test_examples_longer_than_max_length_are_dropped_not_truncated(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from retrain.train.qlora import data as qlora

    run_dir = make_run_dir(tmp_path / "run", str(tiny_model), n=30)
    rows = qlora.load_split(run_dir / "train.jsonl")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    lengths = sorted(qlora.example_length(tok, r) for r in rows)
    limit = lengths[len(lengths) // 2]
    kept, dropped = qlora.drop_too_long(tok, rows, limit)
    assert dropped == sum(1 for n in lengths if n > limit) > 0
    assert all(qlora.example_length(tok, r) <= limit for r in kept)
    (run_dir / "val.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n')
    with pytest.raises(ValueError, match=r"val.jsonl:1: the last message must be the assistant's answer"):
        qlora.load_split(run_dir / "val.jsonl")


def test_4bit_gradients_stay_correct_after_an_evaluation_pass(tiny_model):
    """Guards against bitsandbytes' inference-only CPU repacking (see qlora.cpu.keep_4bit_trainable_on_cpu)."""
    import torch
    from peft import get_peft_model

    from retrain.train.qlora import trainer as qlora

    spec = parse_spec({"adapter": "qlora", "lora_dropout": 0.0})
    x = torch.randint(5, 500, (2, 24))

    def grads(evaluate_first: bool) -> dict:
        model = qlora.load_model(str(tiny_model), spec, cuda=False)
        torch.manual_seed(1)
        cfg = qlora.lora_config(spec)
        cfg.init_lora_weights = False  # non-zero B, so gradients reach every adapter matrix
        model = get_peft_model(model, cfg)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = grads(False), grads(True)
    assert fresh.keys() == after_eval.keys() and len(fresh) >= 14
    for name, g in fresh.items():
        assert torch.allclose(g, after_eval[name], rtol=1e-4, atol=1e-7), name


def test_lora_top_layers_adapts_only_the_top_layers_and_backward_stops_below_them(tiny_model):
    import torch
    from peft import get_peft_model

    from retrain.train.qlora import trainer as qlora

    spec = parse_spec({"adapter": "qlora", "lora_top_layers": 1})
    model = qlora.load_model(str(tiny_model), spec, cuda=False)
    n_layers = model.config.num_hidden_layers
    cfg = qlora.lora_config(spec, model)
    assert sorted(cfg.target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    cfg.init_lora_weights = False
    model = get_peft_model(model, cfg)
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {n_layers - 1}

    # Nothing below the adapted layer needs a gradient, so the backward pass never enters the lower layers.
    needs_grad = []
    lower = model.base_model.model.model.layers[n_layers - 2]
    lower.register_forward_hook(lambda mod, args, out: needs_grad.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    x = torch.randint(5, 500, (2, 16))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert needs_grad == [False] and all(p.grad is not None for p in model.parameters() if p.requires_grad)

    with pytest.raises(ValueError, match=f"base model has {n_layers} layers"):
        qlora.lora_config(parse_spec({"lora_top_layers": n_layers + 1}), model.base_model.model)
    with pytest.raises(TrainingSpecError, match="lora_top_layers"):
        parse_spec({"lora_top_layers": 0})


def test_label_token_weight_reweights_the_decision_tokens_in_the_training_loss_only(tiny_model, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from retrain.train.qlora.cpu import cpu_speedups
    from retrain.train.qlora.data import load_split
    from retrain.train.qlora.trainer import build_trainer
    from retrain.train.qlora.weighting import decision_mask, label_decision_points

    tok = AutoTokenizer.from_pretrained(tiny_model)
    points = label_decision_points(tok, UC)
    # Per label field: the key's last tokens and one first-token id per value (5 intents, 4 budget tiers).
    assert [len(ids) for _, ids in points] == [5, 4]
    run_dir = make_run_dir(tmp_path / "run", str(tiny_model), n=40)
    rows = load_split(run_dir / "train.jsonl")
    spec = parse_spec({"adapter": "lora", "label_token_weight": 5, "max_steps": 1, "batch_size": 8})
    # As the trainer process runs it on a CPU: with TRL's compact LM head (cpu_speedups), which the weights scale.
    with cpu_speedups():
        _check_label_weighting(build_trainer(spec, str(tiny_model), rows, [], tmp_path / "out", cuda=False,
                                             label_points=points), points, decision_mask)


def _check_label_weighting(trainer, points, decision_mask) -> None:
    import torch

    assert type(trainer).__name__ == "WeightedSFTTrainer"
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # Exactly the two decisions of each answer (intent, budget) are marked, not other occurrences of those ids.
    decisions = decision_mask(batch["input_ids"], points)
    assert decisions.sum(1).tolist() == [2] * batch["input_ids"].shape[0]
    assert bool((batch["labels"][decisions] != -100).all())

    model = trainer.model
    model.train()
    weighted = trainer.compute_loss(model, dict(batch)).item()

    # The same loss by hand: token NLLs, decision tokens x5, weights renormalised to mean 1.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    w = torch.where(decisions[:, 1:][mask], 5.0, 1.0)
    w = w * len(w) / w.sum()
    assert weighted == pytest.approx(float((nll * w).mean()), rel=1e-4)

    weighting, trainer.label_weighting = trainer.label_weighting, None
    plain = trainer.compute_loss(model, dict(batch)).item()
    assert plain == pytest.approx(float(nll.mean()), rel=1e-4) and abs(plain - weighted) > 1e-3
    # Validation loss stays the plain one, comparable across runs and settings.
    trainer.label_weighting = weighting
    model.eval()
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(plain, rel=1e-4)


# --- third-party patches stay in the trainer process ---------------------------------------------------

_SNAPSHOT_IMPORTS = r"""
import importlib, json, pkgutil, sys, types
import bitsandbytes, peft, transformers, trl, trl.trainer.utils, trl.kernels.chunked_logprob  # noqa: E401
import transformers.trainer, peft.tuners.lora, bitsandbytes.nn  # noqa: E401

THIRD_PARTY = ("trl", "transformers", "peft", "bitsandbytes")

def snapshot():
    out = {}
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in THIRD_PARTY and isinstance(mod, types.ModuleType):
            out[name] = {k: id(v) for k, v in list(vars(mod).items()) if not isinstance(v, types.ModuleType)}
    for cls in (bitsandbytes.nn.Linear4bit, transformers.Trainer, trl.SFTTrainer):
        out[cls.__qualname__] = {k: id(v) for k, v in vars(cls).items()}
    return out

before = snapshot()
import retrain.train, retrain.train.qlora, retrain.train.openai  # noqa: E401
names = ["retrain.train.launch", "retrain.train.spec"]
for pkg in ("retrain.train.qlora", "retrain.train.openai"):
    names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(sys.modules[pkg].__path__)]
for name in names:
    importlib.import_module(name)
after = snapshot()
changed = sorted(f"{mod}.{attr}" for mod, attrs in before.items() for attr, ident in attrs.items()
                 if after.get(mod, {}).get(attr, ident) != ident)
print(json.dumps({"imported": names, "changed": changed}))
"""


def test_importing_the_training_modules_patches_no_third_party_attribute(tmp_path):
    """Process-wide patches of TRL/transformers/PEFT/bitsandbytes belong to the trainer process only: importing
    every retrain.train module (what the Airflow worker, the DAG files and the tests do) leaves them untouched."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", _SNAPSHOT_IMPORTS], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"retrain.train.qlora.trainer", "retrain.train.qlora.cpu", "retrain.train.launch",
            "retrain.train.openai.job"} <= set(report["imported"])
    assert report["changed"] == [], f"importing retrain.train patched third-party attributes: {report['changed']}"


def test_cpu_speedups_patch_trl_only_inside_the_block():
    import torch
    import trl.trainer.utils as trl_utils

    from retrain.train.qlora.cpu import cpu_speedups

    before = trl_patch_points()
    stock_compact = trl_utils._use_triton
    with cpu_speedups() as applied:
        assert applied == ["smaller_lm_head_tiles_on_cpu", "score_only_labelled_tokens_on_cpu"]
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 4096
        assert trl_utils._use_triton(torch.device("cpu")) is True  # the compact LM head on the CPU
        with cpu_speedups():  # nested (e.g. a bench inside a trainer): still applied once, still undone once
            assert trl_utils._use_triton(torch.device("cpu")) is True
        assert trl_utils._use_triton(torch.device("cpu")) is True and trl_utils._use_triton is not stock_compact
    assert trl_patch_points() == before and trl_utils._use_triton is stock_compact


# --- the launcher and the artifacts ---------------------------------------------------------------------


def test_tiny_llama_qlora_via_launch_writes_every_artifact(tiny_model, tmp_path, caplog, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.train.launch import train_qlora

    caplog.set_level(logging.INFO, logger=LAUNCH_LOGGER)
    run_dir = make_run_dir(tmp_path / "run", str(tiny_model))
    result = train_qlora(str(run_dir), extra_overrides=FAST)
    cand = run_dir / "candidate"

    assert result == json.loads((cand / "train_result.json").read_text())
    assert result["backend"] == "qlora" and result["adapter"] == "qlora" and result["quantized"] is True
    assert result["base_model"] == str(tiny_model) and result["compute_dtype"] == "float32"
    assert result["steps"] == 8 and result["resumed_from_step"] is None
    assert result["eval_loss"] < result["eval_loss_initial"], "validation loss must fall"
    assert result["model_spec"] == {"kind": "hf", "path": str(cand / "merged"), "label": "candidate"}

    # Progress reached the caller's log line by line: step, loss, tokens/s, ETA; and evaluations.
    lines = launch_lines(caplog)
    steps = [ln for ln in lines if ln.startswith("[train] step")]
    assert len(steps) >= 8 and re.search(r"step 8/8 loss \d+\.\d+ .*tokens/s \d+ .*eta", steps[-1]), steps[-1]
    assert any(ln.startswith("[eval] step 0/8 eval_loss") for ln in lines)
    # The trainer process (not this one) applied its CPU patches of TRL.
    assert any(ln.startswith("[train] cpu speed-ups: smaller_lm_head_tiles_on_cpu, score_only_labelled_tokens_on_cpu")
               for ln in lines)

    # Adapter: safetensors LoRA matrices only.
    with safe_open(str(cand / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert json.loads((cand / "adapter" / "adapter_config.json").read_text())["r"] == 16

    # Merged: a plain full-precision model whose weights differ from the base by the adapter's update.
    merged = AutoModelForCausalLM.from_pretrained(cand / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not hasattr(merged.config, "quantization_config")
    w_m = merged.model.layers[0].self_attn.q_proj.weight
    w_b = base.model.layers[0].self_attn.q_proj.weight
    assert w_m.dtype == w_b.dtype and w_m.shape == w_b.shape and not w_m.equal(w_b)
    tok = AutoTokenizer.from_pretrained(cand / "merged")
    assert tok.chat_template == CHATML
    prompt = tok.apply_chat_template([{"role": "user", "content": "regalo"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    assert merged.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]

    assert list((cand / "tb").rglob("events.out.tfevents.*"))
    assert (cand / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (cand / "loss.png").stat().st_size > 5000
    card = (cand / "model_card.md").read_text()
    manifest_sha = hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()
    assert manifest_sha in card and str(tiny_model) in card and "validation loss before training" in card
    modelfile = (cand / "Modelfile").read_text()
    assert "FROM ./merged" in modelfile and "PARAMETER temperature 0" in modelfile
    assert "<|im_start|>system\n{{ .System }}<|im_end|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f'SYSTEM """{UC.system_prompt}"""' in modelfile

    # `retrain score` compares the base model and the candidate on the validation split (no gate, no writes).
    from retrain.cli.main import main as cli_main

    assert cli_main(["score", "--run-dir", str(run_dir), "--split", "val"]) == 0
    scored = json.loads(capsys.readouterr().out)
    n_val = sum(1 for line in (run_dir / "val.jsonl").read_text().splitlines() if line.strip())
    assert scored["split"] == "val" and scored["examples"] == n_val and set(scored["models"]) == {"base", "candidate"}
    for metrics_ in scored["models"].values():
        assert set(metrics_) >= {"primary_score", "exact_match", "json_validity"}
        assert all(0 <= v <= 1 for v in metrics_.values())
    # After cleanup the split files live only in the encrypted backup: the error says how to get them back.
    from retrain.stages import score_split

    (run_dir / "val.jsonl").rename(tmp_path / "val.jsonl")
    (run_dir / "backup.json").write_text(json.dumps({"backup_id": "product_intent/run-1/abc"}))
    with pytest.raises(FileNotFoundError, match="removed by cleanup.*retrain backup restore product_intent/run-1/abc"):
        score_split(run_dir, "val")
    (run_dir / "backup.json").unlink()
    (tmp_path / "val.jsonl").rename(run_dir / "val.jsonl")

    # A retry after success returns the finished result without training again.
    caplog.clear()
    again = train_qlora(str(run_dir), extra_overrides=FAST)
    assert again == result and any("already finished" in ln for ln in launch_lines(caplog))
    assert not any(ln.startswith("[train]") for ln in launch_lines(caplog))


def test_a_crashing_trainer_raises_with_its_stderr(tiny_model, tmp_path):
    from retrain.train.launch import TrainingFailed, train_qlora

    run_dir = make_run_dir(tmp_path / "run", str(tiny_model), n=30)
    with open(run_dir / "train.jsonl", "a") as fh:
        fh.write("this is not json\n")
    lines = (run_dir / "train.jsonl").read_text().count("\n")
    with pytest.raises(RuntimeError) as err:
        train_qlora(str(run_dir), extra_overrides=FAST)
    assert isinstance(err.value, TrainingFailed)
    message = str(err.value)
    assert "exited with status 1" in message and f"train.jsonl:{lines}" in message  # the trainer's own error
    assert "Traceback" in message and (run_dir / "candidate" / "trainer.log").is_file()


def test_killed_trainer_resumes_from_the_newest_complete_checkpoint(tiny_model, tmp_path, caplog):
    from retrain.train.launch import TrainingFailed, train_qlora
    from retrain.train.qlora.checkpoints import is_complete_checkpoint, latest_complete_checkpoint

    caplog.set_level(logging.INFO, logger=LAUNCH_LOGGER)
    run_dir = make_run_dir(tmp_path / "run", str(tiny_model))
    overrides = {**FAST, "adapter": "lora", "max_steps": 40, "eval_steps": 3, "save_steps": 3,
                 "early_stopping_patience": None, "learning_rate": 1e-3}
    cand = run_dir / "candidate"
    checkpoints = cand / "checkpoints"
    failure: list[BaseException] = []

    def first_run() -> None:
        try:
            train_qlora(str(run_dir), extra_overrides=overrides)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        if latest_complete_checkpoint(checkpoints) is not None and (cand / "trainer.pid").is_file():
            os.kill(int((cand / "trainer.pid").read_text()), signal.SIGKILL)
            break
        time.sleep(0.02)
    thread.join(120)
    assert failure and isinstance(failure[0], TrainingFailed), "the trainer finished before it could be killed"
    assert "was killed by SIGKILL" in str(failure[0])
    assert not (cand / "train_result.json").exists()

    newest = latest_complete_checkpoint(checkpoints)
    killed_at = int(newest.name.split("-")[1])
    assert 0 < killed_at < 40
    # A checkpoint the kill interrupted (no trainer state yet) must be ignored.
    torn = checkpoints / "checkpoint-39"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"partial")
    assert not is_complete_checkpoint(torn) and latest_complete_checkpoint(checkpoints) == newest

    caplog.clear()
    result = train_qlora(str(run_dir), extra_overrides=overrides)
    lines = launch_lines(caplog)
    assert any(f"resuming from checkpoint-{killed_at} (step {killed_at})" in ln for ln in lines)
    first_step = int(re.search(r"\[train\] step (\d+)/40", next(ln for ln in lines if ln.startswith("[train] step")))[1])
    assert first_step > killed_at, "training restarted from step 0 instead of resuming"
    assert result["resumed_from_step"] == killed_at and result["steps"] == 40
    # The trainer state (log history with the first run's step-0 evaluation) came back with the checkpoint.
    assert result["eval_loss_initial"] is not None and result["eval_loss"] < result["eval_loss_initial"]


# --- slow: distributed, and the real model --------------------------------------------------------------


@pytest.mark.slow
def test_two_process_data_parallel_lora_on_cpu(tiny_model, tmp_path, caplog, monkeypatch):
    from retrain.train.launch import train_qlora

    caplog.set_level(logging.INFO, logger=LAUNCH_LOGGER)
    monkeypatch.setenv("RETRAIN_TRAIN_PROCESSES", "2")
    run_dir = make_run_dir(tmp_path / "run", str(tiny_model))
    result = train_qlora(str(run_dir), extra_overrides={**FAST, "adapter": "lora"})
    assert result["processes"] == 2 and result["device"] == "cpu" and result["steps"] == 8
    assert any("launching the trainer (2 processes)" in ln and "accelerate.commands.launch" in ln
               for ln in launch_lines(caplog))
    # Each step consumed batch 4 on each of the 2 ranks: 8 steps x 8 examples.
    assert result["epochs"] == pytest.approx(8 * 8 / result["train_examples"], rel=0.05)
    assert (run_dir / "candidate" / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_real_smollm2_qlora_learns_product_intent(db_conn, caplog):
    """The Done-means check: real SmolLM2-135M-Instruct, QLoRA nf4 on the CPU, a pipeline-built dataset."""
    from retrain import stages
    from retrain.data.synthetic import seed_examples
    from retrain.train.launch import train_qlora

    caplog.set_level(logging.INFO, logger=LAUNCH_LOGGER)
    seed_examples(db_conn, UC, 600, seed=7, dirty=0.0)
    run_dir = stages.prepare_run("product_intent", "manual__smollm2_qlora", {})["run_dir"]
    stages.collect(run_dir)
    stages.build(run_dir)

    overrides = json.loads(os.environ.get("RETRAIN_SLOW_TRAIN_OVERRIDES", "{}")) or {
        "max_steps": 60, "eval_steps": 20, "save_steps": 20, "learning_rate": 1e-3,
    }
    result = train_qlora(run_dir, extra_overrides=overrides)
    # Scored the way the gate scores: the same prompts, schema-guided greedy decoding, the use case's metrics.
    scores = stages.score_split(run_dir, "val", ("base", "candidate"))["models"]
    before, after = scores["base"], scores["candidate"]
    report = {"before": before, "after": after, "eval_loss_initial": result["eval_loss_initial"],
              "eval_loss": result["eval_loss"], "train_loss_first": result["train_loss_first"],
              "train_loss": result["train_loss"], "steps": result["steps"], "seconds": result["seconds"],
              "tokens_per_second": result["tokens_per_second"]}
    print("SMOLLM2_QLORA_REPORT", json.dumps(report))
    (Path(run_dir) / "slow_test_report.json").write_text(json.dumps(report, indent=2))
    assert result["quantized"] and result["device"] == "cpu"
    assert result["eval_loss"] < 0.5 * result["eval_loss_initial"], report
    # intent_type exact match; measured 0.000 -> 0.614 after these 60 steps (0.931 on test after the demo's 160).
    assert after["primary_score"] >= before["primary_score"] + 0.3, report
    assert after["json_validity"] >= 0.9 and after["schema_validity"] >= 0.9, report
