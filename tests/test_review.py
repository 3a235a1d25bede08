"""Active learning (issue 19): hard-example selection, the review_queue table, the Label Studio export, and the
import of reviewed answers back into production_examples (round trip through the next collection).

The models are two tiny random Llamas with SmolLM2's tokenizer (different seeds, so they disagree and hesitate):
fast, and every selection reason shows up.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from retrain.review import labelstudio
from retrain.review.select import hardness, rank, sample_rows, token_at, value_offset
from retrain.rundir import RunDir
from retrain.schemas.use_case import ConfigError, load_use_case, parse_use_case
from test_train import FAST, tiny_model  # noqa: F401 - fixture (a random Llama with a 600-token tokenizer)

UC = load_use_case("product_intent")


# --- pure parts ---------------------------------------------------------------------------------------------------


def test_value_offset_finds_where_the_primary_value_starts():
    text = '{"intent_type": "GIFT", "budget_tier": "premium"}'
    assert text[value_offset(text, "intent_type"):].startswith('GIFT"')
    assert text[value_offset(text, "budget_tier"):].startswith('premium"')
    assert value_offset('{"a": {"b": true}}', "a.b") == len('{"a": {"b": ')
    assert value_offset('{"other": 1}', "intent_type") is None
    assert value_offset('{"intent_type": ', "intent_type") is None  # truncated answer


class _CharTokenizer:
    """Every token is one character (ids = code points): offsets and token indices coincide."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_token_at_maps_a_character_offset_to_the_token_covering_it():
    ids = [ord(c) for c in '{"k": "v"}']
    assert token_at(_CharTokenizer(), ids, 7) == 7
    assert token_at(_CharTokenizer(), ids, 99) is None


def _side(label="GIFT", valid=True, margin=None):
    return {"schema_valid": valid, "has_label": label is not None, "label": label, "margin": margin}


def test_hardness_reasons_and_ranking():
    assert hardness(_side(margin=5.0), _side(), margin_below=1.0) == (pytest.approx(0.006738, abs=1e-6), [])
    score, reasons = hardness(_side(margin=0.1), _side("URGENT"), margin_below=1.0)
    assert reasons == ["disagreement", "low_margin"] and score > 2.9
    assert hardness(_side(valid=False, label=None), _side(), margin_below=1.0)[1] == ["schema_failure"]
    # A model that only failed the schema on the production side still makes the row hard.
    assert hardness(_side(margin=3.0), _side(valid=False), margin_below=1.0)[1] == ["schema_failure"]
    rows = [{"source_id": i, "candidate": {"margin": m}, "score": s, "reasons": r}
            for i, (m, s, r) in enumerate([(0.5, 0.6, ["low_margin"]), (4.0, 0.01, []), (0.1, 2.9, ["disagreement"]),
                                           (0.2, 0.8, ["low_margin"])])]
    ranked = rank(rows, 2)
    assert [(r["source_id"], r["rank"]) for r in ranked] == [(2, 1), (3, 2)]
    assert [r["source_id"] for r in rank(rows, 10)] == [2, 3, 0]  # a row without a reason is never queued


def test_sampling_is_deterministic_and_bounded():
    rows = [{"source_id": i} for i in range(100)]
    a, b = sample_rows(rows, 10), sample_rows(list(reversed(rows)), 10)
    assert a == b and len(a) == 10 and [r["source_id"] for r in a] == sorted(r["source_id"] for r in a)


def test_review_config_is_validated_by_name():
    raw = UC.model_dump(mode="json")
    with pytest.raises(ConfigError, match="review.max_exampels"):
        parse_use_case({**raw, "review": {"max_exampels": 3}})
    with pytest.raises(ConfigError, match="review.margin_below"):
        parse_use_case({**raw, "review": {"margin_below": -1}})
    assert parse_use_case(raw).review.max_examples == 50 and parse_use_case(raw).review.table_sample == 0


# --- reading what Label Studio exports ------------------------------------------------------------------------------

GOOD = {"intent_type": "GIFT", "budget_tier": "premium", "category": "watches", "recipient": "father",
        "context_tags": ["birthday"], "priority_features": ["quality"]}


def test_reviewed_answer_rules():
    data = {"candidate_answer": json.dumps(GOOD)}
    # Choice only: the candidate's answer with the chosen primary label.
    assert labelstudio.reviewed_answer(UC, data, {"label": "URGENT"}) == {**GOOD, "intent_type": "URGENT"}
    # The whole answer in the TextArea, agreeing with the choice.
    fixed = {**GOOD, "category": "wrist watches"}
    assert labelstudio.reviewed_answer(UC, data, {"label": "GIFT", "answer": json.dumps(fixed)}) == fixed
    with pytest.raises(ValueError, match="says intent_type=\"BUSINESS\" but the choice is 'GIFT'"):
        labelstudio.reviewed_answer(UC, data, {"label": "GIFT",
                                               "answer": json.dumps({**GOOD, "intent_type": "BUSINESS"})})
    with pytest.raises(ValueError, match="not one JSON object"):
        labelstudio.reviewed_answer(UC, data, {"answer": "intent: GIFT"})
    with pytest.raises(ValueError, match="not an allowed value"):
        labelstudio.reviewed_answer(UC, data, {"label": "GIFTS"})
    with pytest.raises(ValueError, match="nothing was reviewed"):
        labelstudio.reviewed_answer(UC, data, {})
    with pytest.raises(ValueError, match="candidate's answer is not JSON"):
        labelstudio.reviewed_answer(UC, {"candidate_answer": '{"intent_type": "GI'}, {"label": "GIFT"})


def test_final_annotation_skips_cancelled_ones_and_takes_the_newest():
    t = {"annotations": [{"id": 1, "updated_at": "2026-12-01T10:00:00Z", "result": []},
                         {"id": 2, "updated_at": "2026-12-02T10:00:00Z", "result": []},
                         {"id": 3, "updated_at": "2026-12-03T10:00:00Z", "was_cancelled": True, "result": []}]}
    assert labelstudio.final_annotation(t)["id"] == 2
    assert labelstudio.final_annotation({"annotations": []}) is None


def test_a_file_that_is_not_a_label_studio_export_is_one_line():
    with pytest.raises(labelstudio.ReviewFileError, match="not JSON"):
        labelstudio.read_export("this is not json")
    with pytest.raises(labelstudio.ReviewFileError, match="expected a JSON list of tasks"):
        labelstudio.read_export('{"id": 1}')


def test_labeling_config_is_xml_with_every_allowed_label():
    root = ET.fromstring(labelstudio.labeling_config(UC))
    choices = root.find("Choices")
    assert choices.get("name") == "label" and choices.get("toName") == "input"
    assert [c.get("value") for c in choices] == UC.allowed_labels["intent_type"]
    assert root.find("TextArea").get("name") == "answer"
    assert {t.get("value") for t in root.iter("Text")} >= {"$input", "$candidate_answer", "$production_answer",
                                                           "$reasons"}


# --- round trip: batch -> selection -> queue -> export -> reviewer -> import -> next collection ----------------


CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(path: Path):
    """A 600-token BPE trained on product_intent traffic (labels included) with a ChatML template: the schema guard
    scans a 600-token vocabulary per step instead of SmolLM2's 49k, so guided answers of random models are fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from retrain.data.synthetic import generate_rows

    texts = []
    for r in generate_rows(UC, 300, seed=99, dirty=0.0):
        texts += [r["input"] or "", json.dumps(r["corrected_output"] or r["model_output"] or {})]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + [UC.system_prompt], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(path)
    return hf


def _tiny_llama(path: Path, tokenizer, seed: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Two random 2-layer Llamas sharing a small tokenizer (different seeds: the production and the candidate)."""
    tok = _tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))
    return {name: _tiny_llama(tmp_path_factory.mktemp(f"tiny-{name}"), tok, seed)
            for name, seed in (("production", 0), ("candidate", 1))}


def test_margin_is_the_top2_gap_where_the_primary_value_starts(tiny_models):
    """The teacher-forced margin, batched (left padding, two prompt lengths), equals a plain full forward pass."""
    import torch

    from retrain.evaluate.inference import make_engine
    from retrain.review.select import primary_margins

    engine = make_engine({"kind": "hf", "path": tiny_models["candidate"]})
    tok = engine.tokenizer
    answers = ['{"intent_type": "GIFT", "budget_tier": "premium"}',
               '{"budget_tier": "economic", "intent_type": "URGENT"}',
               '{"budget_tier": "economic"}']
    convs = [[{"role": "system", "content": UC.system_prompt}, {"role": "user", "content": q}]
             for q in ("regalo para mi padre", "need a cheap laptop for work asap, under 300 dollars please", "x")]
    gens = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    found = primary_margins(engine, convs, gens, answers, "intent_type")
    assert found[2] is None  # no primary label in the answer: no margin
    for conv, gen, answer, (margin, top) in zip(convs, gens, answers, found[:2]):
        k = token_at(tok, gen, value_offset(answer, "intent_type"))
        assert tok.decode(gen[:k + 1]).endswith(("G", "GI", "GIF", "GIFT", "U", "UR", "URG", "URGENT", '"G', '"U'))
        prompt = engine.prompt_ids(conv)
        with torch.inference_mode():
            logits = engine.model(input_ids=torch.tensor([prompt + gen])).logits[0, len(prompt) + k - 1]
        values, indices = torch.log_softmax(logits.float(), -1).topk(2)
        assert margin == pytest.approx(float(values[0] - values[1]), abs=1e-4) and margin >= 0
        assert top == [tok.decode([int(indices[0])]), tok.decode([int(indices[1])])]


@pytest.fixture
def review_db(db_conn):
    with db_conn.cursor() as cur:
        cur.execute("TRUNCATE review_queue")
    db_conn.commit()
    return db_conn


ROWS = 40


def _prepared_run(db_conn, tiny_models, run_id: str, **review) -> RunDir:
    """A run whose rows were collected and whose evaluation named the two tiny models (models.json)."""
    from retrain import stages
    from retrain.rundir import write_json

    out = stages.prepare_run("product_intent", run_id, {})
    rd = RunDir(out["run_dir"])
    meta = json.loads(rd.run_config.read_text())
    meta["use_case"]["review"] = {"max_examples": 6, "max_scored": 8, **review}
    # Short answers (two enums) keep random models' guided answers short; import validates against the YAML.
    meta["use_case"]["output_schema"] = {
        "type": "object", "additionalProperties": False, "required": ["intent_type", "budget_tier"],
        "properties": {k: UC.output_schema["properties"][k] for k in ("intent_type", "budget_tier")}}
    meta["use_case"]["fields"] = {"labels": ["intent_type", "budget_tier"], "primary": "intent_type"}
    meta["use_case"]["evaluation"]["slices"] = []
    write_json(rd.run_config, meta)
    stages.collect(rd.path)
    write_json(rd.models, {
        "baseline": {"kind": "hf", "path": tiny_models["production"], "label": "baseline",
                     "baseline_kind": "production"},
        "candidate": {"kind": "hf", "path": tiny_models["candidate"], "label": "candidate"}})
    return rd


def _queue(db_conn, run_id: str) -> list[tuple]:
    with db_conn.cursor() as cur:
        cur.execute("SELECT source_id, rank, reasons, status FROM review_queue WHERE run_id = %s ORDER BY rank",
                    (run_id,))
        rows = cur.fetchall()
    db_conn.commit()
    return rows


def _example(db_conn, source_id: int) -> tuple:
    with db_conn.cursor() as cur:
        cur.execute("SELECT corrected_output, feedback, updated_at FROM production_examples WHERE id = %s",
                    (source_id,))
        row = cur.fetchone()
    db_conn.commit()
    return row


def _ls_export(tasks: list[dict], answers: dict[int, list[dict]]) -> list[dict]:
    """The shape Label Studio writes on a JSON export: ids, the task data as imported, annotations[].result[]."""
    out = []
    for i, t in enumerate(tasks):
        task = {"id": 500 + i, "data": t["data"], "predictions": t.get("predictions", []), "project": 3,
                "annotations": []}
        if i in answers:
            task["annotations"] = [{"id": 900 + i, "completed_by": 1, "was_cancelled": False, "ground_truth": False,
                                    "created_at": "2026-12-03T10:00:00Z", "updated_at": "2026-12-03T10:00:00Z",
                                    "lead_time": 4.2, "result": answers[i]}]
        out.append(task)
    return out


def _ui_plugin():
    import importlib.util

    spec = importlib.util.spec_from_file_location("retrain_ui_for_review", Path(__file__).parents[1] / "plugins" /
                                                  "retrain_ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _choice(value: str) -> dict:
    return {"id": "c1", "from_name": "label", "to_name": "input", "type": "choices", "origin": "manual",
            "value": {"choices": [value]}}


def _textarea(answer: dict | str) -> dict:
    text = answer if isinstance(answer, str) else json.dumps(answer)
    return {"id": "t1", "from_name": "answer", "to_name": "input", "type": "textarea", "origin": "manual",
            "value": {"text": [text]}}


def test_round_trip_from_a_runs_batch_to_the_next_collection(review_db, tiny_models, tmp_path, capsys):
    from retrain.cli.main import main
    from retrain.data.collect import collect_examples
    from retrain.data.synthetic import seed_examples
    from retrain.review import workflow

    seed_examples(review_db, UC, ROWS, seed=3, dirty=0.0)
    rd = _prepared_run(review_db, tiny_models, "review-month-1")

    summary = workflow.select_run(rd.path)
    queued = _queue(review_db, "review-month-1")
    assert summary["status"] == "ok" and summary["scored"] == 8 and 1 <= summary["queued"] == len(queued) <= 6
    assert [r[1] for r in queued] == list(range(1, len(queued) + 1))
    assert set(summary["reasons"]) <= {"schema_failure", "disagreement", "low_margin"} and summary["reasons"]
    # Random models under guided decoding mostly loop on JSON whitespace: schema failures (margins: see below).
    assert summary["top"][0]["rank"] == 1 and summary["models"]["candidate"] == tiny_models["candidate"]
    assert workflow.summary_line(json.loads(rd.review_summary.read_text())).startswith(
        f"REVIEW: {len(queued)} queued of 8 rows scored (")

    # A retried task (same run) replaces the run's queue: same rows, no duplicates.
    again = workflow.select_run(rd.path)
    assert _queue(review_db, "review-month-1") == queued and again["queued"] == summary["queued"]

    # The export: Label Studio tasks (data + the candidate's label as a prediction) and the labeling config.
    tasks = json.loads(rd.review_export.read_text())
    assert len(tasks) == len(queued) and rd.review_labeling_config.is_file()
    assert {"input", "candidate_answer", "production_answer", "reasons", "source_id", "run_id",
            "use_case"} <= set(tasks[0]["data"])
    assert [t["data"]["source_id"] for t in tasks] == [r[0] for r in queued]
    for t in tasks:
        for p in t.get("predictions", []):
            assert p["result"][0]["from_name"] == "label" and p["result"][0]["value"]["choices"][0] in \
                UC.allowed_labels["intent_type"]
    assert len(queued) >= 2, "the tiny models must leave at least two hard rows for the import cases below"

    # A reviewer answers: the first task with the whole answer, the second with a choice on a full answer; a third
    # breaks the schema; a task of another run's queue is unknown; the rest stay unreviewed.
    reviewed = {0: {**GOOD, "intent_type": "BUSINESS"}, 1: {**GOOD, "intent_type": "URGENT", "category": "drills"}}
    answers = {0: [_textarea(reviewed[0])], 1: [_choice("URGENT"), _textarea(reviewed[1])]}
    export = _ls_export(tasks, answers)
    broken = dict(export[0], id=777, annotations=[dict(export[0]["annotations"][0],
                                                       result=[_textarea({**GOOD, "budget_tier": "cheap"})])])
    if len(tasks) >= 3:
        export[2]["annotations"] = broken["annotations"]
        export[2]["id"] = 777
    else:
        export.append(dict(broken, data=dict(tasks[1]["data"])))
        export[-1]["annotations"] = broken["annotations"]
    unknown = dict(export[0], id=778, data={**export[0]["data"], "source_id": 987654})
    export.append(unknown)
    path = tmp_path / "project-3-at-2026-12-03.json"
    path.write_text(json.dumps(export))

    before = {r[0]: _example(review_db, r[0]) for r in queued}
    assert main(["review", "import", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "error: task 777 (example" in err and "breaks the product_intent output schema at budget_tier" in err
    assert "error: task 778 (example 987654): unknown task" in err
    assert "\n2 reviewed answers written as corrections, 0 unchanged" in "\n" + out

    for i in (0, 1):
        source_id = tasks[i]["data"]["source_id"]
        corrected, feedback, updated = _example(review_db, source_id)
        assert corrected == reviewed[i] and feedback == "corrected" and updated > before[source_id][2]
    statuses = {r[0]: r[3] for r in _queue(review_db, "review-month-1")}
    assert [statuses[tasks[i]["data"]["source_id"]] for i in (0, 1)] == ["reviewed", "reviewed"]
    assert list(statuses.values()).count("reviewed") == 2  # the refused task and the unanswered ones stay queued

    # Importing the same file again changes nothing (not even updated_at: collection would pick the row up again).
    after = {i: _example(review_db, tasks[i]["data"]["source_id"]) for i in (0, 1)}
    assert workflow.import_file(path)["imported"] == 0
    assert {i: _example(review_db, tasks[i]["data"]["source_id"]) for i in (0, 1)} == after
    assert workflow.import_file(path)["unchanged"] == 2

    # The next collection picks the corrected rows up, with the reviewers' answers as labels.
    batch = tmp_path / "next_batch.jsonl"
    collect_examples(review_db, "product_intent", "review-month-2", batch)
    lines = {json.loads(line)["source_id"]: json.loads(line) for line in batch.read_text().splitlines()}
    for i in (0, 1):
        row = lines[tasks[i]["data"]["source_id"]]
        assert row["feedback"] == "corrected" and row["label_raw"] == reviewed[i]

    # The UI page: the run's REVIEW line (queued, top reasons, reviewed since) and a link to the export.
    ui = _ui_plugin()
    row = next(r for r in ui.overview("product_intent")["runs"] if r["run_id"] == "review-month-1")
    assert row["review"].startswith(f"REVIEW: {len(queued)} queued of 8 rows scored (") and \
        row["review"].endswith("; 2 reviewed")
    assert row["reports"]["review tasks"].endswith("review-month-1/review/label_studio_tasks.json")
    assert row["review"] in ui.render_page({**ui.overview("product_intent")}).replace("&#39;", "'")

    # The CLI export re-writes the queue (reviewed rows counted) to a chosen file.
    target = tmp_path / "again.json"
    assert main(["review", "export", "--use-case", "product_intent", "--out", str(target)]) == 0
    assert "(2 already reviewed)" in capsys.readouterr().out
    assert len(json.loads(target.read_text())) == len(queued) and (tmp_path / RunDir.REVIEW_LABELING_CONFIG).is_file()


def test_cli_bad_input_is_one_line_without_a_traceback(review_db, tmp_path, capsys):
    from retrain.cli.main import main

    bad = tmp_path / "export.json"
    bad.write_text("<html>not json</html>")
    assert main(["review", "import", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1 and "not JSON" in err
    assert main(["review", "import", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot read" in err
    assert main(["review", "export", "--use-case", "product_intent"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no review queue yet" in err
    assert main(["review", "export", "--use-case", "no_such_case"]) == 2
    assert "unknown use case" in capsys.readouterr().err


def test_a_failing_selection_never_raises_and_says_why(review_db, tiny_models, tmp_path):
    """The task must never fail the run: a broken model path is logged and written to the review summary."""
    from retrain import stages
    from retrain.data.synthetic import seed_examples
    from retrain.review.workflow import summary_line
    from retrain.rundir import write_json

    seed_examples(review_db, UC, ROWS, seed=4, dirty=0.0)
    rd = _prepared_run(review_db, tiny_models, "review-broken")
    models = json.loads(rd.models.read_text())
    models["candidate"]["path"] = str(tmp_path / "gone")
    write_json(rd.models, models)
    out = stages.select_for_review(rd.path)
    assert out["status"] == "failed" and "cannot load the model" in out["error"]
    line = summary_line(json.loads(rd.review_summary.read_text()))
    assert line.startswith("REVIEW: failed (InferenceError: cannot load the model")
    assert _queue(review_db, "review-broken") == []


def test_models_behind_a_paid_api_are_opt_in(review_db, tiny_models):
    """An OpenAI-hosted model answers per paid request and has no logits: the review queue stays off unless asked."""
    from retrain.data.synthetic import seed_examples
    from retrain.review import workflow
    from retrain.rundir import write_json

    seed_examples(review_db, UC, ROWS, seed=7, dirty=0.0)
    rd = _prepared_run(review_db, tiny_models, "review-openai")
    models = json.loads(rd.models.read_text())
    models["candidate"] = {"kind": "openai", "model": "ft:gpt-4o-mini:acme::x1", "label": "candidate"}
    write_json(rd.models, models)
    summary = workflow.select_run(rd.path)
    assert summary["status"] == "off" and "set review.score_remote_models: true" in summary["reason"]
    assert workflow.summary_line(summary).startswith("REVIEW: off (ft:gpt-4o-mini:acme::x1 answer through a paid API")
    assert _queue(review_db, "review-openai") == []


def test_table_sample_adds_older_uncorrected_rows(review_db, tiny_models):
    """review.table_sample also scores older rows of the table (default off), scrubbed, never already-corrected."""
    from retrain.data.synthetic import seed_examples
    from retrain.review import workflow

    seed_examples(review_db, UC, ROWS, seed=5, dirty=0.0)
    first = _prepared_run(review_db, tiny_models, "review-sample-1")  # moves the watermark past these rows
    seed_examples(review_db, UC, 4, seed=6, dirty=0.0)
    rd = _prepared_run(review_db, tiny_models, "review-sample-2", table_sample=5, max_scored=4, max_examples=50)
    summary = workflow.select_run(rd.path)
    assert summary["table_sample"] == 5 and summary["scored"] == 9
    assert first.batch.is_file()


# --- in the DAG: beside the gate, never in its way ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("breaks", [False, True], ids=["queues", "fails"])
def test_in_the_dag_review_runs_beside_the_gate_and_never_stops_a_go(breaks, db_conn, tmp_path, monkeypatch,
                                                                     airflow_db, backup_env, task_log, tiny_model):
    """A GO deploys whether the review queue works (REVIEW line, queue rows, cleanup after it) or breaks."""
    import copy

    import yaml
    from airflow.dag_processing.dagbag import DagBag

    from conftest import states
    from retrain.data.synthetic import seed_examples

    tiny = tiny_model
    with db_conn.cursor() as cur:
        cur.execute("TRUNCATE review_queue")
    db_conn.commit()
    data = copy.deepcopy(yaml.safe_load((Path(__file__).parents[1] / "include" / "use_cases" /
                                         "product_intent.yaml").read_text()))
    data["training"].update({**FAST, "max_steps": 4, "eval_steps": 2, "save_steps": 2, "max_length": 256,
                             "early_stopping_patience": None, "base_model": str(tiny), "epochs": 1})
    data["review"] = {"max_examples": 5, "max_scored": 6}
    (tmp_path / "use_cases").mkdir()
    (tmp_path / "use_cases" / "product_intent.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(tmp_path / "use_cases"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if breaks:
        def broken(*args, **kwargs):
            raise RuntimeError("the review model server is down")

        monkeypatch.setattr("retrain.review.select.score_rows", broken)
        monkeypatch.setattr("retrain.review.workflow.score_rows", broken)
    dag = DagBag(str(Path(__file__).parents[1] / "dags" / "retrain_use_cases.py")).dags["retrain_product_intent"]
    seed_examples(db_conn, UC, 200, seed=8, dirty=0.0)
    with db_conn.cursor() as cur:  # inside the data interval of a dag.test() run (the month before its tick)
        cur.execute("UPDATE production_examples SET updated_at = date_trunc('month', now()) - interval '10 days', "
                    "created_at = date_trunc('month', now()) - interval '10 days'")
    db_conn.commit()
    run = dag.test(run_conf={"min_score": 0.0, "min_json_validity": 0.0, "min_relative_improvement": -1.0,
                             "gate_override_reason": "review smoke test: 4 CPU steps"})
    out = task_log()
    st = states(run)
    for task in ("evaluate_candidate", "decide", "deploy_model", "select_for_review", "backup_to_s3", "cleanup"):
        assert st[task] == "success", (task, out[-6000:])
    rd = RunDir.for_run("product_intent", run.run_id)
    summary = json.loads(rd.review_summary.read_text())
    if breaks:
        assert summary["status"] == "failed" and "the review model server is down" in summary["error"]
        assert _queue(db_conn, run.run_id) == []
    else:
        assert summary["status"] == "ok" and summary["scored"] == 6 and summary["queued"] == len(
            _queue(db_conn, run.run_id)) >= 1
        assert rd.review_export.is_file() and not rd.batch.exists()  # cleanup ran after the review read the batch
