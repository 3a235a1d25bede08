"""Label Studio files: the import file of a run's queue, its labeling config, and reading Label Studio's export.

The labeling config (written next to the import file; paste it under Settings → Labeling Interface):

* ``<Choices name="label">`` — the primary label, one of the schema's allowed values (pre-filled with the
  candidate's label as a prediction, so a reviewer who agrees only submits);
* ``<TextArea name="answer">`` — optional: the whole corrected answer as JSON, when more than the primary label is
  wrong (entities, other labels). Left empty, the candidate's answer is the base.

The reviewed answer is the base (TextArea JSON, else the candidate's answer) with the chosen primary label applied;
it must be valid under the output schema. A TextArea answer whose primary label contradicts the chosen one is
refused rather than guessed at.

Each task carries its queue key in ``data`` (``use_case``, ``run_id``, ``source_id``): Label Studio keeps a
task's data in its export, so `retrain review import` finds the queue row and the production example again.
"""

from __future__ import annotations

import json
import math
from typing import Any
from xml.sax.saxutils import quoteattr

LABEL = "label"
ANSWER = "answer"
TO_NAME = "input"


def _label_text(value: Any) -> str:
    """How a label value appears as a Label Studio choice (strings as they are, others as JSON: true, 3)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def labeling_config(uc) -> str:
    """The labeling config XML for this use case's tasks."""
    choices = "\n".join(f"    <Choice value={quoteattr(_label_text(v))}/>" for v in uc.allowed_labels[uc.primary_label])
    return f"""<View>
  <Header value="Production input"/>
  <Text name="{TO_NAME}" value="$input"/>
  <Header value="Why this example is here"/>
  <Text name="why" value="$reasons"/>
  <Header value="Candidate model's answer"/>
  <Text name="candidate" value="$candidate_answer"/>
  <Header value="Production model's answer"/>
  <Text name="production" value="$production_answer"/>
  <Header value={quoteattr(f"Correct {uc.primary_label}")}/>
  <Choices name="{LABEL}" toName="{TO_NAME}" choice="single" required="true" showInline="false">
{choices}
  </Choices>
  <Header value="Corrected answer as JSON (optional: only when more than {uc.primary_label} is wrong)"/>
  <TextArea name="{ANSWER}" toName="{TO_NAME}" rows="6" maxSubmissions="1" editable="true"/>
</View>
"""


def task(uc, row: dict) -> dict:
    """One Label Studio task (import format) of a review_queue row, the candidate's label as a prediction."""
    details = row.get("details") or {}
    data = {
        "input": row["input"],
        "candidate_answer": row.get("candidate_output") or "",
        "production_answer": row.get("production_output") or "",
        "reasons": ", ".join(row["reasons"]),
        "use_case": row["use_case"],
        "run_id": row["run_id"],
        "source_id": int(row["source_id"]),
        "rank": int(row["rank"]),
        "score": float(row["score"]),
        "margin": row.get("margin"),
    }
    out: dict[str, Any] = {"data": data}
    label = (details.get("candidate") or {}).get("label")
    allowed = [_label_text(v) for v in uc.allowed_labels[uc.primary_label]]
    if label is not None and _label_text(label) in allowed:
        margin = row.get("margin")
        prediction: dict[str, Any] = {
            "model_version": f"candidate of {row['run_id']}",
            "result": [{"from_name": LABEL, "to_name": TO_NAME, "type": "choices",
                        "value": {"choices": [_label_text(label)]}}],
        }
        if margin is not None:  # Label Studio sorts and filters tasks by prediction score: the least sure first
            prediction["score"] = round(1.0 / (1.0 + math.exp(-margin)), 4)
        out["predictions"] = [prediction]
    return out


def tasks(uc, rows: list[dict]) -> list[dict]:
    return [task(uc, r) for r in rows]


# --- reading Label Studio's export ------------------------------------------------------------------------------


class ReviewFileError(ValueError):
    """The file is not a Label Studio JSON export: one line says why."""


def read_export(text: str) -> list[dict]:
    """The tasks of a Label Studio JSON export (a list of tasks; an object holding ``tasks`` is accepted too)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ReviewFileError(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): export the project "
                              "from Label Studio as JSON") from None
    if isinstance(data, dict) and isinstance(data.get("tasks"), list):
        data = data["tasks"]
    if not isinstance(data, list):
        raise ReviewFileError(f"expected a JSON list of tasks (Label Studio's JSON export), got a "
                              f"{type(data).__name__}")
    return data


def task_name(t: Any, index: int) -> str:
    """How an error line names a task: Label Studio's id and the queue's source id when known."""
    if not isinstance(t, dict):
        return f"task #{index + 1}"
    data = t.get("data") if isinstance(t.get("data"), dict) else {}
    parts = [f"task {t['id']}" if "id" in t else f"task #{index + 1}"]
    if "source_id" in data:
        parts.append(f"(example {data['source_id']})")
    return " ".join(parts)


def final_annotation(t: dict) -> dict | None:
    """The annotation that counts: the newest one not cancelled (skipped) by its annotator."""
    annotations = [a for a in t.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return None
    return max(enumerate(annotations), key=lambda p: (str(p[1].get("updated_at") or p[1].get("created_at") or ""),
                                                      p[0]))[1]


def controls(annotation: dict) -> dict[str, Any]:
    """{control name: its value} from an annotation's result list (choices: the first choice; textarea: its text)."""
    out: dict[str, Any] = {}
    for item in annotation.get("result") or []:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            continue
        value = item["value"]
        if item.get("from_name") == LABEL and value.get("choices"):
            out[LABEL] = value["choices"][0]
        elif item.get("from_name") == ANSWER and value.get("text"):
            text = value["text"]
            out[ANSWER] = "\n".join(text) if isinstance(text, list) else str(text)
    return out


def reviewed_answer(uc, data: dict, values: dict[str, Any]) -> dict:
    """The reviewer's answer (see the module docstring); ValueError with one line on a bad one."""
    from retrain.evaluate.metrics import parse_output

    primary = uc.primary_label
    if values.get(ANSWER, "").strip():
        answer, strict = parse_output(values[ANSWER])
        if answer is None or not strict:
            raise ValueError(f"the '{ANSWER}' text is not one JSON object")
    else:
        answer, _ = parse_output(data.get("candidate_answer"))
        if answer is None:
            raise ValueError(f"the candidate's answer is not JSON: write the whole answer in '{ANSWER}'")
        if LABEL not in values:
            raise ValueError(f"no '{LABEL}' choice and no '{ANSWER}' text: nothing was reviewed")
    if LABEL in values:
        allowed = {_label_text(v): v for v in uc.allowed_labels[primary]}
        if values[LABEL] not in allowed:
            raise ValueError(f"{primary} {values[LABEL]!r} is not an allowed value")
        chosen = allowed[values[LABEL]]
        node = answer
        parts = primary.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ValueError(f"the answer has no object to hold {primary}")
        if values.get(ANSWER, "").strip() and parts[-1] in node and node[parts[-1]] != chosen:
            raise ValueError(f"the '{ANSWER}' JSON says {primary}={json.dumps(node[parts[-1]], ensure_ascii=False)} "
                             f"but the choice is {values[LABEL]!r}: make them agree")
        node[parts[-1]] = chosen
    return answer
