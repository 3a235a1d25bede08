"""The trainer's view of a run's splits: chat ``messages`` examples as TRL prompt/completion pairs.

Examples longer than ``max_length`` are dropped rather than truncated, because a truncated completion teaches the
model to emit broken JSON.
"""

from __future__ import annotations

import json
from pathlib import Path


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
