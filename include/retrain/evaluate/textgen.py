"""Free-text generation for generation use cases (issue 20): a base model alone, with a PEFT adapter, or merged.

Two things the evaluation of a tenant's adapter needs, on the same loaded model:

* :meth:`TextModel.generate`: greedy replies to chat conversations, each stopped at the end-of-turn token or after
  ``max_new_tokens`` (the use case's ``output.max_tokens``); other special tokens are never generated. Batched with left padding and mask-derived position
  ids, float32 on CPU: a batch gives the tokens of one-by-one generation. No JSON stopping rule (the structured
  engine's ``retrain.evaluate.inference.HFEngine`` cuts at the first closed ``{...}``, which an e-mail may contain).
* :meth:`TextModel.reply_nll`: the summed negative log-likelihood and token count of each reference reply (plus
  its end-of-turn token) after its prompt, i.e. per-token perplexity = exp(sum NLL / sum tokens).

Model spec: ``{"path": <base model name or dir, or a merged model>, "adapter": <dir or None>}``; ``adapter`` may
also be a tenant export or deployed version directory (its ``adapter/`` sub-directory is used). Base-model names
resolve as everywhere else (``retrain.evaluate.inference``: the offline default, local paths, hub ids).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrain.evaluate.inference import InferenceError, _resolve_path, prompt_messages

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
BATCH_SIZE = 8


def adapter_dir(path: str | Path | None) -> str | None:
    """The PEFT adapter directory in ``path`` (itself or its ``adapter/``), None for no adapter."""
    if not path:
        return None
    p = Path(path).expanduser()
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return str(candidate)
    raise InferenceError(f"{p} holds no PEFT adapter (adapter_config.json, or adapter/adapter_config.json): point "
                         "the spec's adapter at the tenant's trained adapter or deployed version directory")


class TextModel:
    """One loaded causal LM (optionally with a LoRA adapter merged in) for free-text replies and reply NLLs."""

    def __init__(self, spec: dict, *, batch_size: int = BATCH_SIZE):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not spec.get("path"):
            raise InferenceError(f"a text model spec needs 'path' (base model name or directory): {spec}")
        self.label = spec.get("label")
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        started = time.perf_counter()
        base = _resolve_path(str(spec["path"]))
        adapter = adapter_dir(spec.get("adapter"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
            if adapter:
                from peft import PeftModel

                # Merged: no extra LoRA matmuls per forward pass; the numbers are the adapter's.
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as exc:
            raise InferenceError(f"cannot load {base}{' + adapter ' + adapter if adapter else ''}: {exc}") from exc
        self.model = model.to(self.device).eval()
        self.source = base + (f" + adapter {adapter}" if adapter else "")
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        if not ids:
            raise InferenceError(f"{base} defines no end-of-sequence token: generation could not stop")
        self.eos_ids = sorted(ids)
        # A reply is text: the other special tokens (padding, begin-of-turn) would be dropped from it anyway and
        # only burn the token budget, so they are never generated.
        self.suppress_ids = sorted(set(tok.all_special_ids) - ids)
        # The token a finished reply ends with in training (the chat template's end of turn = tokenizer EOS).
        self.end_id = tok.eos_token_id if tok.eos_token_id is not None else self.eos_ids[0]
        log.info("loaded %s (%s) on %s in %.1f s", self.label or "model", self.source, self.device,
                 time.perf_counter() - started)

    # prompts ----------------------------------------------------------------------------------------------
    def prompt_ids(self, conversation: Any) -> list[int]:
        messages = prompt_messages(conversation)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # generation -------------------------------------------------------------------------------------------
    def generate(self, conversations: Sequence[Any], *, max_new_tokens: int | None = None) -> list[dict]:
        """One ``{"text", "tokens", "latency_s", "stopped"}`` per conversation, in input order (greedy)."""
        import torch
        from transformers import GenerationConfig

        budget = int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        prompts = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[dict] = [{} for _ in prompts]
        config = GenerationConfig(max_new_tokens=budget, do_sample=False, num_beams=1, temperature=None, top_p=None,
                                  top_k=None, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
                                  suppress_tokens=self.suppress_ids or None)
        eos = set(self.eos_ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                attention[row, width - len(prompts[i]):] = 1
            began = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                          generation_config=config)
            seconds = time.perf_counter() - began
            for row, i in enumerate(idx):
                gen = out[row, width:].tolist()
                end = next((k for k, t in enumerate(gen) if t in eos), None)
                ids = gen if end is None else gen[:end]
                results[i] = {"text": self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                              "tokens": len(ids), "latency_s": seconds / len(idx), "stopped": end is not None}
        return results

    # likelihood of reference replies --------------------------------------------------------------------------
    def reply_nll(self, conversations: Sequence[Any], replies: Sequence[str]) -> list[tuple[float, int]]:
        """(sum of the reply tokens' negative log-likelihoods in nats, number of tokens) per reference reply.

        The reply is scored as the model would emit it after the prompt: its tokens plus the end-of-turn token.
        """
        import torch

        if len(conversations) != len(replies):
            raise InferenceError(f"{len(conversations)} conversations but {len(replies)} replies to score")
        out = []
        with torch.inference_mode():
            for conversation, reply in zip(conversations, replies):
                prompt = self.prompt_ids(conversation)
                target = self.tokenizer(str(reply), add_special_tokens=False)["input_ids"] + [self.end_id]
                ids = torch.tensor([prompt + target], dtype=torch.long, device=self.device)
                logits = self.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
                nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum")
                out.append((float(nll), len(target)))
        return out


def perplexity(nll: Sequence[tuple[float, int]]) -> float | None:
    """Per-token perplexity over all replies: exp(total NLL / total tokens)."""
    tokens = sum(n for _, n in nll)
    return math.exp(sum(s for s, _ in nll) / tokens) if tokens else None
