"""Generation use cases (issue 20), the pipeline side: free-text generation and reply likelihoods with or without an
adapter, tenant registry keys, the per-tenant export (adapter + Ollama Modelfile), per-tenant deploy and rollback,
the tenant plan, and the DAG end to end (dag.test() with a tiny random Llama as the base model)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from retrain.rundir import RunDir
from test_train import FAST, _one_thread_for_tiny_models, tiny_model  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
YAML = yaml.safe_load((REPO / "include" / "use_cases" / "email_voice.yaml").read_text())
SYSTEM = YAML["system_prompt"]


def conversation(subject: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": YAML["input_template"].format(input=subject)}]


@pytest.fixture(scope="module")
def random_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny model: changes its outputs, no training needed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def use_case_dir(directory: Path, tiny_model: Path, **changes) -> Path:
    """A use-case directory holding a copy of email_voice.yaml that trains the tiny model for a few steps."""
    data = copy.deepcopy(YAML)
    # max_length 1024: the tiny model's 600-token vocabulary spells an e-mail in ~300-500 tokens.
    data["training"].update({**FAST, "max_steps": 4, "eval_steps": 2, "save_steps": 2, "max_length": 1024,
                             "early_stopping_patience": None, "base_model": str(tiny_model), "epochs": 1,
                             "adapter": "lora", "load_in_4bit": False})
    data["output"]["max_tokens"] = 24
    for key, value in changes.items():
        data[key] = value if not isinstance(value, dict) else {**(data.get(key) or {}), **value}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "email_voice.yaml").write_text(yaml.safe_dump(data))
    return directory


# --- registry keys --------------------------------------------------------------------------------------------


def test_model_key_is_use_case_at_tenant_and_unsafe_tenants_cannot_escape_the_models_dir():
    from retrain.registry.tenants import TenantError, is_tenant_key, model_key, split_key

    assert model_key("email_voice", "alice") == "email_voice@alice"
    assert split_key("email_voice@alice") == ("email_voice", "alice") and split_key("product_intent")[1] is None
    assert is_tenant_key("email_voice@bob") and not is_tenant_key("email_voice")
    hostile = model_key("email_voice", "../../etc")
    assert "/" not in hostile and ".." not in hostile.split("@", 1)[1][:2]
    # Two tenants whose names differ only in unsafe characters never share a key (nor a model directory).
    assert model_key("email_voice", "a/b") != model_key("email_voice", "a_b")
    for bad in ("", "   "):
        with pytest.raises(TenantError, match="not a tenant id"):
            model_key("email_voice", bad)
    with pytest.raises(TenantError, match="cannot carry a tenant"):
        model_key("email@voice", "alice")


# --- free-text generation -------------------------------------------------------------------------------------


def test_generation_is_greedy_batched_like_one_by_one_and_an_adapter_changes_it(tiny_model, random_adapter):
    from retrain.evaluate.textgen import TextModel

    prompts = [conversation(s) for s in ("Budget review", "Update on the client demo for the board", "Hi")]
    base = TextModel({"path": str(tiny_model)}, batch_size=3)
    batched = base.generate(prompts, max_new_tokens=12)
    base.batch_size = 1
    assert [r["text"] for r in base.generate(prompts, max_new_tokens=12)] == [r["text"] for r in batched]
    assert all(0 < r["tokens"] <= 12 for r in batched)
    # Special tokens other than the end of turn (padding, begin-of-turn) are never generated in a reply.
    assert base.suppress_ids and not set(base.suppress_ids) & set(base.eos_ids)
    tuned = TextModel({"path": str(tiny_model), "adapter": str(random_adapter)}, batch_size=3)
    assert [r["text"] for r in tuned.generate(prompts, max_new_tokens=12)] != [r["text"] for r in batched]
    # A prompt with a trailing assistant turn (a test row) is answered without it.
    row = [*prompts[0], {"role": "assistant", "content": "the label"}]
    assert tuned.generate([row], max_new_tokens=12)[0]["text"] == tuned.generate(prompts[:1], max_new_tokens=12)[0][
        "text"]


def test_generation_stops_at_the_end_of_turn_token(tiny_model):
    from retrain.evaluate.textgen import TextModel

    model = TextModel({"path": str(tiny_model)})
    prompt = [conversation("Notes from the weekly sync")]
    first = model.generate(prompt, max_new_tokens=8)[0]
    assert first["tokens"] == 8 and not first["stopped"]  # a random model does not stop by itself
    # Make a token it greedily writes later (and not before) the end of turn: the reply is cut there, without it.
    import torch

    ids = model.prompt_ids(prompt[0])
    with torch.inference_mode():
        gen = model.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    gen = gen.tolist()
    k = next((i for i in range(1, len(gen)) if gen[i] not in gen[:i]), 0)  # 0: it repeats one token
    model.eos_ids = [gen[k]]
    cut = model.generate(prompt, max_new_tokens=8)[0]
    assert cut["stopped"] and cut["tokens"] == k
    assert cut["text"] == model.tokenizer.decode(gen[:k], skip_special_tokens=True).strip()


def test_reply_nll_scores_reply_tokens_plus_end_of_turn(tiny_model, random_adapter):
    import math

    import torch

    from retrain.evaluate.textgen import TextModel, perplexity

    model = TextModel({"path": str(tiny_model)})
    prompts = [conversation("Budget review"), conversation("Office move")]
    replies = ["Dear Laura,\n\nThank you for the update.\n\nKind regards,\nAlice", "Hey Tom! Sounds good. Cheers, Bob"]
    nll = model.reply_nll(prompts, replies)
    tok = model.tokenizer
    assert [n for _, n in nll] == [len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies]
    # The same number by hand: the labels of a full forward pass, prompt tokens masked out.
    prompt_ids = model.prompt_ids(prompts[0])
    target = tok(replies[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + target])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100
    with torch.inference_mode():
        mean = model.model(input_ids=ids, labels=labels).loss.item()
    assert nll[0][0] == pytest.approx(mean * len(target), rel=1e-4)
    assert perplexity(nll) == pytest.approx(math.exp(sum(s for s, _ in nll) / sum(n for _, n in nll)))
    assert perplexity([]) is None
    with pytest.raises(Exception, match="2 conversations but 1 replies"):
        model.reply_nll(prompts, replies[:1])


def test_adapter_dir_accepts_a_bare_adapter_or_an_export_and_names_what_is_missing(random_adapter, tmp_path):
    from retrain.evaluate.inference import InferenceError
    from retrain.evaluate.textgen import adapter_dir

    assert adapter_dir(None) is None and adapter_dir(random_adapter) == str(random_adapter)
    export = tmp_path / "v1"
    (export / "adapter").mkdir(parents=True)
    (export / "adapter" / "adapter_config.json").write_text("{}")
    assert adapter_dir(export) == str(export / "adapter")
    with pytest.raises(InferenceError, match="holds no PEFT adapter"):
        adapter_dir(tmp_path / "nothing")


# --- export, deploy and rollback per tenant -------------------------------------------------------------------


def export_for(tmp_path: Path, tiny_model: Path, adapter: Path, key: str, run_id: str) -> Path:
    from retrain.registry.tenants import write_export

    return write_export(tmp_path / run_id / "export", adapter_dir=adapter, base_model=str(tiny_model),
                        base_path=str(tiny_model), key=key, run_id=run_id, system_prompt=SYSTEM, max_tokens=160)


def test_export_holds_the_adapter_and_an_ollama_modelfile_with_adapter(tiny_model, random_adapter, tmp_path):
    export = export_for(tmp_path, tiny_model, random_adapter, "email_voice@alice", "m1")
    text = (export / "Modelfile").read_text()
    assert f"FROM {tiny_model}\nADAPTER ./adapter\n" in text
    assert "<|im_start|>assistant" in text and f'SYSTEM """{SYSTEM}"""' in text and "PARAMETER num_predict 160" in text
    assert "ollama create email_voice-alice -f Modelfile" in text
    assert (export / "adapter" / "adapter_config.json").is_file()
    meta = json.loads((export / "EXPORT.json").read_text())
    assert (meta["tenant"], meta["use_case"], meta["merged"]) == ("alice", "email_voice", False)
    again = export_for(tmp_path, tiny_model, random_adapter, "email_voice@alice", "m1")  # a retry rebuilds it
    assert again == export and not export.with_name("export.tmp").exists()
    from retrain.registry.tenants import TenantError, write_export

    with pytest.raises(TenantError, match="holds no PEFT adapter"):
        write_export(tmp_path / "x", adapter_dir=tmp_path, base_model="b", base_path=str(tiny_model), key="u@t",
                     run_id="r", system_prompt=SYSTEM)


def test_export_merged_option_b_deploys_the_merged_model_next_to_the_adapter(tiny_model, random_adapter, tmp_path):
    """tenants.export_merged (seed 003's option B): merged/ beside adapter/, the Modelfile says how to use it."""
    from retrain.generation import _export_merged
    from retrain.registry.tenants import write_export
    from retrain.schemas.use_case import load_use_case

    uc = load_use_case("email_voice")
    assert _export_merged(uc) is False  # option A by default: adapters only
    assert _export_merged(uc.model_copy(update={"tenants": uc.tenants.model_copy(update={"export_merged": True})}))
    export = write_export(tmp_path / "export", adapter_dir=random_adapter, base_model=str(tiny_model),
                          base_path=str(tiny_model), key="email_voice@bob", run_id="m1", system_prompt=SYSTEM,
                          merged_dir=tiny_model)
    assert (export / "merged" / "config.json").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    assert "FROM ./merged" in (export / "Modelfile").read_text()
    assert json.loads((export / "EXPORT.json").read_text())["merged"] is True


def test_export_merged_is_a_boolean_field_of_tenants():
    from retrain.schemas.generation import TenantRules

    assert TenantRules(export_merged=True).export_merged is True
    with pytest.raises(ValueError, match="export_merged"):
        TenantRules(export_merged="sometimes")


def test_each_tenant_has_its_own_versions_alias_and_rollback(db_conn, tiny_model, random_adapter, tmp_path,
                                                             monkeypatch):
    from retrain.registry import deploy
    from retrain.registry import store as registry
    from retrain.registry.store import RegistryError
    from retrain.registry.tenants import TenantError, model_key, run_rollback

    uc_dir = use_case_dir(tmp_path / "uc", tiny_model)
    (uc_dir / "product_intent.yaml").write_text((REPO / "include" / "use_cases" / "product_intent.yaml").read_text())
    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(uc_dir))
    versions = {}
    for tenant, runs in (("alice", ("m1", "m2")), ("bob", ("m1",))):
        key = model_key("email_voice", tenant)
        for run_id in runs:
            export = export_for(tmp_path / tenant, tiny_model, random_adapter, key, run_id)
            row = registry.register_candidate(db_conn, use_case=key, run_id=f"{run_id}#tenant-{tenant}",
                                              backend="qlora", base_model=str(tiny_model), artifact=str(export))
            deploy.deploy(db_conn, use_case=key, version=row["version"], actor="test", reason="gate said GO",
                          run_id=row["run_id"])
            versions[(tenant, run_id)] = row["version"]
    assert versions == {("alice", "m1"): 1, ("alice", "m2"): 2, ("bob", "m1"): 1}  # numbered per tenant
    alice = deploy.production_link("email_voice@alice")
    assert os.readlink(alice) == "versions/v2" and (alice / "Modelfile").is_file()
    assert (alice / "adapter" / "adapter_config.json").is_file()
    assert os.readlink(deploy.production_link("email_voice@bob")) == "versions/v1"
    # The production adapter is what the next month's candidate must beat.
    row = registry.production(db_conn, "email_voice@alice")
    assert deploy.model_path(row) == str(deploy.version_dir("email_voice@alice", 2))

    with pytest.raises(RegistryError, match="at least 10 characters"):
        run_rollback("email_voice", "alice", reason="bad", actor="test")
    out = run_rollback("email_voice", "alice", reason="drafts sound like somebody else", actor="ops")
    assert (out["version"], out["key"]) == (1, "email_voice@alice")
    assert os.readlink(alice) == "versions/v1"
    assert os.readlink(deploy.production_link("email_voice@bob")) == "versions/v1"  # the other tenant is untouched
    assert registry.production(db_conn, "email_voice@bob")["version"] == 1
    with pytest.raises(TenantError, match="has no tenants"):
        run_rollback("product_intent", "alice", reason="drafts sound like somebody else", actor="ops")


# --- the plan -------------------------------------------------------------------------------------------------


def planned_run(tmp_path: Path, tiny_model: Path, monkeypatch, params: dict | None = None) -> Path:
    """A run directory as build_dataset leaves it, written by hand: alice and bob eligible, dan below the minimum."""
    from retrain.data.synthetic.email_voice import rows
    from retrain.schemas.use_case import load_use_case
    from retrain.rundir import write_json

    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(use_case_dir(tmp_path / "uc", tiny_model)))
    uc = load_use_case("email_voice")
    rd = RunDir(tmp_path / "run")
    meta = {"run_id": "manual__m1", "params": params or {}, "use_case": uc.model_dump(mode="json")}
    write_json(rd.run_config, meta)
    write_json(rd.manifest, {"new_rows": 200, "counts": {}})
    tenants = {}
    for tenant, n in (("alice", 60), ("bob", 60), ("dan", 12)):
        eligible = n >= 50
        tenants[tenant] = {"train": n, "val": 0, "test": 0, "eligible": eligible,
                           "reason": None if eligible else f"{n} examples, fewer than tenants.min_examples=50"}
        if not eligible:
            continue  # as dataset_text writes it: no sub-run directory below the minimum
        sub = rd.tenant(tenant)
        write_json(sub.run_config, {**meta, "run_id": f"manual__m1#tenant-{tenant}"})
        lines = [json.dumps({"messages": [*conversation(r["input"]), {"role": "assistant",
                                                                      "content": r["corrected_output"]}]})
                 for r in rows({tenant: n}, seed=1)]
        sub.split("train").write_text("\n".join(lines) + "\n")
    write_json(rd.tenants_manifest, {"tenants": tenants, "min_examples": 50, "recommended_examples": 200})
    return rd.path


def test_plan_lists_eligible_tenants_skips_the_rest_with_the_reason_and_fits_the_classifier(
        pg_url, tiny_model, tmp_path, monkeypatch):
    from retrain.evaluate.attribution import VoiceClassifier
    from retrain.generation import plan_tenants

    run_dir = planned_run(tmp_path, tiny_model, monkeypatch)
    planned = plan_tenants(run_dir)
    assert [p["tenant"] for p in planned] == ["alice", "bob"]
    assert planned[0]["key"] == "email_voice@alice" and planned[0]["run_dir"].endswith("tenants/alice")
    rd = RunDir(run_dir)
    plan = json.loads(rd.tenants_plan.read_text())
    assert plan["tenants"]["dan"] == {"status": "skipped", "reason": "12 examples, fewer than "
                                      "tenants.min_examples=50", "train": 12, "val": 0, "test": 0}
    classifier = VoiceClassifier.load(rd.voice_classifier)  # fitted once, on the trained tenants' e-mails
    assert sorted(classifier.classes) == ["alice", "bob"]


@pytest.mark.parametrize(("params", "manifest_new_rows", "reason"), [
    ({"dry_run": True}, 200, "dry_run"),
    ({}, 0, "nothing to retrain"),
])
def test_plan_trains_nobody_on_a_dry_run_or_without_new_data(pg_url, tiny_model, tmp_path, monkeypatch, params,
                                                              manifest_new_rows, reason):
    from retrain.generation import plan_tenants
    from retrain.rundir import write_json

    run_dir = planned_run(tmp_path, tiny_model, monkeypatch, params)
    write_json(RunDir(run_dir).manifest, {"new_rows": manifest_new_rows, "counts": {}})
    assert plan_tenants(run_dir) == []
    plan = json.loads(RunDir(run_dir).tenants_plan.read_text())
    assert plan["train"] is False and reason in plan["reason"]
    assert plan["tenants"]["alice"]["status"] == "not_trained" and plan["tenants"]["dan"]["status"] == "skipped"


# --- the DAG --------------------------------------------------------------------------------------------------


def generation_bag(directory: Path, monkeypatch, tiny_model: Path, **changes):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(use_case_dir(directory, tiny_model, **changes)))
    bag = DagBag(str(REPO / "dags" / "retrain_generation.py"))
    assert bag.import_errors == {}
    return bag.dags["retrain_email_voice"]


def test_the_generation_dag_maps_the_tenant_tasks_on_the_gpu_pool(tmp_path, monkeypatch, tiny_model, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = generation_bag(tmp_path / "uc", monkeypatch, tiny_model)
    order = [t.task_id for t in dag.topological_sort()]
    assert order == ["prepare_run", "collect_examples", "build_dataset", "validate_dataset", "plan_tenants",
                     "train_tenant", "evaluate_tenant", "decide_tenant", "summarize_tenants", "backup_to_s3",
                     "verify_backup", "prune_backups", "cleanup"]
    train = dag.get_task("train_tenant")
    assert train.queue == "gpu" and train.pool == "gpu"
    assert dag.get_task("summarize_tenants").trigger_rule == "none_failed_min_one_success"
    assert {"retrain", "email_voice", "generation"} <= set(dag.tags)
    # The structured DAG file skips generation use cases: one DAG per use case.
    other = DagBag(str(REPO / "dags" / "retrain_use_cases.py"))
    assert "retrain_email_voice" not in other.dags


# Month 1 must be GO for the test to reach deploy, but a tiny random Llama trained for a few steps learns no voice
# (its replies are mostly newlines). No YAML can loosen the gate into a GO for it (the chrF rule wants a gain whose CI
# excludes 0; an empty reply fails the length rule), so month 1 runs the real gate and records its checks but has
# its verdict forced to GO (lenient_decide; dag.test runs the tasks in this process). Month 2 runs the real gate
# unchanged: a retrained adapter does not beat the production one by min_chrf_gain, NO-GO.
def lenient_decide(real):
    def decide(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "decision": "GO", "failed": [], "summary": f"GO (forced by the test; the gate said: "
                                                                    f"{out['summary']})"}

    return decide


@pytest.mark.integration
def test_dag_trains_each_eligible_tenant_deploys_go_and_month_two_is_no_go(db_conn, tmp_path, monkeypatch, tiny_model,
                                                                           airflow_db, backup_env, task_log):
    from conftest import registry_rows, states
    from retrain.data.synthetic import insert_rows
    from retrain.data.synthetic.email_voice import rows
    from retrain.registry import deploy

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dag = generation_bag(tmp_path / "uc", monkeypatch, tiny_model,
                         tenants={"min_examples": 30, "recommended_examples": 60}, data={"min_rows": 60})
    from retrain.evaluate import gate_generation

    insert_rows(db_conn, "email_voice", rows({"alice": 40, "bob": 40, "dan": 10}, seed=3), with_tenant=True)
    real_decide = gate_generation.decide
    monkeypatch.setattr(gate_generation, "decide", lenient_decide(real_decide))
    run = dag.test()
    monkeypatch.setattr(gate_generation, "decide", real_decide)
    out = task_log()
    st = states(run)
    for task in ("prepare_run", "collect_examples", "build_dataset", "validate_dataset", "plan_tenants",
                 "train_tenant", "evaluate_tenant", "decide_tenant", "summarize_tenants", "backup_to_s3",
                 "verify_backup", "prune_backups", "cleanup"):
        assert st[task] == "success", (task, st, out[-6000:])
    mapped = {}
    for ti in run.get_task_instances():
        mapped.setdefault(ti.task_id, []).append(ti.map_index)
    assert sorted(mapped["train_tenant"]) == sorted(mapped["decide_tenant"]) == [0, 1]

    rd = RunDir.for_run("email_voice", run.run_id)
    summary = json.loads(rd.tenants_summary.read_text())
    assert summary["tenants"]["dan"]["status"] == "skipped" and "min_examples" in summary["tenants"]["dan"]["reason"]
    for tenant in ("alice", "bob"):
        t = summary["tenants"][tenant]
        assert t["status"] == "decided" and t["decision"] == "GO", (tenant, t)
        assert t["metrics"]["chrf"]["ci_low"] is not None and t["metrics"]["perplexity"]["candidate"] > 0
        link = deploy.production_link(f"email_voice@{tenant}")
        assert os.readlink(link) == "versions/v1" and "ADAPTER ./adapter" in (link / "Modelfile").read_text()
        (row,) = registry_rows(db_conn, f"email_voice@{tenant}")
        assert row["status"] == "production" and row["decision"]["decision"] == "GO"
        assert row["run_id"] == f"{run.run_id}#tenant-{tenant}"
    assert registry_rows(db_conn, "email_voice@dan") == []
    assert "| dan | skipped |" in rd.tenants_summary_md.read_text()
    # The verified backup holds the tenants' sub-runs (adapters, not checkpoints); cleanup then removes the users'
    # e-mails (the tenants' split files) from the local run directory.
    receipt = rd.read_backup_receipt()
    backed_up = {f["path"] for f in receipt.get("files", [])} if isinstance(receipt.get("files"), list) else set()
    if backed_up:
        assert any(p.startswith("tenants/alice/candidate/") for p in backed_up), sorted(backed_up)[:20]
        assert not any("/checkpoints/" in p for p in backed_up)
    assert not list(rd.tenants_dir.glob("*/train.jsonl")) and not list(rd.tenants_dir.glob("*/test.jsonl"))

    task_log.clear()
    run2 = dag.test(run_conf={"force_retrain": True})
    out = task_log()
    st = states(run2)
    assert st["decide_tenant"] == "success" and st["summarize_tenants"] == "success", (st, out[-6000:])
    rd2 = RunDir.for_run("email_voice", run2.run_id)
    for tenant in ("alice", "bob"):
        decision = json.loads(rd2.tenant(tenant).decision.read_text())
        assert decision["decision"] == "NO-GO" and decision["baseline_kind"] == "production", decision
        assert "min_chrf_gain" in decision["failed"]
        rows_by_version = {r["version"]: r["status"] for r in registry_rows(db_conn, f"email_voice@{tenant}")}
        assert rows_by_version == {1: "production", 2: "rejected"}
        assert os.readlink(deploy.production_link(f"email_voice@{tenant}")) == "versions/v1"


def test_a_configured_judge_is_calibrated_and_run_in_both_orders(tmp_path, tiny_model, monkeypatch):
    from fake_judge import FakeJudge
    from retrain.generation import _judge
    from retrain.schemas.use_case import load_use_case

    judge = FakeJudge(marker="VOICE")
    base_url, stop = judge.start()
    try:
        directory = use_case_dir(tmp_path / "uc", tiny_model, evaluation={"judge": {
            "model": "judge-model", "rubric": "The reply that sounds like the user wins.", "min_kappa": 0.5,
            "base_url": base_url}})
        (directory / "judge_calibration.jsonl").write_text("".join(
            json.dumps({"prompt": "p", "a": a, "b": b, "human": h}) + "\n"
            for a, b, h in (("VOICE x", "y", "A"), ("y", "VOICE x", "B"), ("z", "w", "tie"), ("VOICE", "q", "A"))))
        monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(directory))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        uc = load_use_case("email_voice")
        prompts = [conversation(s) for s in ("Budget", "Launch", "Hiring")]
        out = _judge(uc, prompts, ["VOICE one", "VOICE two", "plain"], ["plain", "plain", "plain"])
    finally:
        stop()
    assert out["calibration"]["calibrated"] is True and out["calibration"]["kappa"] == 1.0
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 0) and out["n"] == 3
    assert judge.requests == 2 * 4 + 2 * 3  # calibration and verdicts, each pair in both orders
    assert _judge(load_use_case("email_voice").model_copy(update={"evaluation": uc.evaluation.model_copy(
        update={"judge": None})}), prompts, [], []) is None
