"""Training throughput: our trainer configuration vs stock TRL ``SFTTrainer`` defaults, same model and data.

Both sides fine-tune the same base model with the same LoRA adapter (and, for ``--adapter qlora``, the same
nf4 base), the same per-device batch size and the same product_intent examples, for the same number of
optimizer steps. Only the trainer configuration differs:

* stock: ``SFTConfig()`` defaults -- gradient checkpointing on, random batches padded to the longest example;
  ``bf16`` is switched off on a CPU because stock ``SFTConfig`` refuses to start there otherwise.
* ours: ``retrain.train.qlora.trainer.sft_config`` -- gradient checkpointing only on CUDA (memory is not what limits a
  CPU), length-grouped batches (less padding), on the CPU the LM head scores only the completion positions (TRL
  does that only where Triton runs) with narrower tiles (less memory), optional padding-free / packing
  (``--padding-free``, ``--packing``).

Throughput is real (non-padding) tokens per second over the timed steps (the first step, which pays for
lazy initialisation, is excluded), from TRL's own ``num_tokens`` counter. Target: ours >= 1.3x stock.

    .venv/bin/python bench/train_throughput.py                       # SmolLM2-135M, qlora, 8 timed steps
    .venv/bin/python bench/train_throughput.py --adapter lora --steps 12 --repeats 2
    .venv/bin/python bench/train_throughput.py --tiny                # tiny random Llama + small vocabulary

Prints one line per measurement and a final JSON line with both rates and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))


def examples(n: int, seed: int = 0) -> list[dict]:
    """product_intent chat examples as prompt/completion pairs (the run-directory contract, no database)."""
    from retrain.schemas.use_case import load_use_case
    from retrain.data.synthetic import generate_rows
    from retrain.train.qlora.data import to_prompt_completion

    uc = load_use_case("product_intent")
    out = []
    for r in generate_rows(uc, n, seed=seed, dirty=0.0):
        label = r["corrected_output"] or r["model_output"]
        if r["feedback"] == "rejected" or not isinstance(label, dict):
            continue
        out.append(to_prompt_completion({"messages": [
            {"role": "system", "content": uc.system_prompt},
            {"role": "user", "content": uc.render_input(r["input"])},
            {"role": "assistant", "content": json.dumps(label, ensure_ascii=False)},
        ]}))
    return out


def tiny_model(directory: Path, rows: list[dict]) -> str:
    """A random 4-layer, 128-wide Llama with a 1,000-token BPE tokenizer trained on the examples and SmolLM2's
    ChatML chat template. The small vocabulary matters: with SmolLM2's 49k tokens the LM head would dominate a
    model this small and hide what the trainer configuration changes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf_tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    hf_tok.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


class _Meter:
    """TrainerCallback timing steps 2..N and reading TRL's real-token counter at both ends."""

    def __new__(cls, trainer_ref: list):
        from transformers import TrainerCallback

        class Meter(TrainerCallback):
            def __init__(self):
                self.t0 = self.t1 = None
                self.n0 = self.n1 = 0

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                tokens = trainer_ref[0]._total_train_tokens
                if state.global_step == 1:
                    self.t0, self.n0 = now, tokens
                self.t1, self.n1 = now, tokens

        return Meter()


def run_side(side: str, base: str, rows: list[dict], spec, steps: int, out: Path) -> dict:
    import torch

    from retrain.train.qlora.cpu import cpu_speedups

    cuda = torch.cuda.is_available()
    # Our trainer narrows TRL's CPU logits tiles (a memory fix) and scores only the completion positions on the
    # CPU (a speed fix), inside cpu_speedups() as the trainer process does; stock keeps TRL's own behaviour.
    # Both sides run in this process: the block restores TRL's originals when our side ends.
    with cpu_speedups() if side == "ours" and not cuda else nullcontext():
        return _run_side(side, base, rows, spec, steps, out, cuda=cuda)


def _run_side(side: str, base: str, rows: list[dict], spec, steps: int, out: Path, *, cuda: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from retrain.train.qlora import trainer as qlora

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = qlora.load_model(base, spec, cuda=cuda)
    ref: list = [None]
    meter = _Meter(ref)
    common = {"output_dir": str(out / side), "max_steps": steps + 1, "report_to": "none", "save_strategy": "no",
              "seed": spec.seed, "disable_tqdm": True, "logging_steps": 1000}
    if side == "stock":
        # Stock defaults, except what a CPU needs to start at all (bf16) and what both sides must share.
        args = SFTConfig(per_device_train_batch_size=spec.batch_size, bf16=cuda, use_cpu=not cuda, **common)
    else:
        args = qlora.sft_config(spec, out / side, cuda=cuda, has_eval=False, eval_on_start=False)
        for key, value in common.items():
            setattr(args, key, value)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=qlora.lora_config(spec, model), callbacks=[meter])
    if spec.quantized and not cuda:
        for p in trainer.model.parameters():  # same float32 adapter on both sides (TRL casts it to bf16)
            if p.requires_grad:
                p.data = p.data.to(torch.float32)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    ref[0] = trainer
    trainer.train()
    seconds = meter.t1 - meter.t0
    tokens = meter.n1 - meter.n0
    result = {"side": side, "tokens": int(tokens), "seconds": round(seconds, 2),
              "tokens_per_second": round(tokens / seconds, 1), "steps_timed": steps,
              "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
              "sampling": trainer.args.train_sampling_strategy, "padding_free": bool(trainer.padding_free)}
    print(json.dumps(result), flush=True)
    del trainer, model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model name, path or hub id")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model (fast)")
    parser.add_argument("--adapter", choices=["qlora", "lora"], default="qlora")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times; medians")
    parser.add_argument("--padding-free", action="store_true", help="our side flattens batches (no padding)")
    parser.add_argument("--packing", action="store_true", help="our side packs examples into max_length blocks")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    from transformers import AutoTokenizer

    from retrain.evaluate.models import resolve_base_model
    from retrain.schemas.training import parse_spec
    from retrain.train.qlora.data import drop_too_long

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp_path = Path(tmp)
        all_rows = examples(args.examples)
        base = tiny_model(tmp_path / "tiny", all_rows) if args.tiny else resolve_base_model(args.model)
        spec = parse_spec({"adapter": args.adapter, "batch_size": args.batch_size, "max_length": 512,
                           "padding_free": args.padding_free, "packing": args.packing})
        rows, _ = drop_too_long(AutoTokenizer.from_pretrained(base), all_rows, spec.max_length)
        print(f"model {base} ({args.adapter}), {len(rows)} examples, batch {args.batch_size}, "
              f"{args.steps} timed steps per side, {args.repeats} repeat(s)", flush=True)
        runs: dict[str, list[dict]] = {"stock": [], "ours": []}
        for i in range(args.repeats):
            order = ("stock", "ours") if i % 2 == 0 else ("ours", "stock")
            for side in order:
                runs[side].append(run_side(side, base, rows, spec, args.steps, tmp_path / f"r{i}"))
        stock = statistics.median(r["tokens_per_second"] for r in runs["stock"])
        ours = statistics.median(r["tokens_per_second"] for r in runs["ours"])
        summary = {"model": args.model if not args.tiny else "tiny-random-llama", "adapter": args.adapter,
                   "stock_tokens_per_second": stock, "ours_tokens_per_second": ours,
                   "ratio": round(ours / stock, 2), "target": 1.3, "meets_target": ours / stock >= 1.3}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
