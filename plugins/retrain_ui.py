"""Airflow UI page for the retraining platform: use cases, production models, registry history, latest runs.

Airflow 3 plugins serve pages through FastAPI apps mounted on the API server (``fastapi_apps``) and put them in
the UI with ``external_views``: with a ``url_route`` the UI embeds the page in an iframe under
``/plugin/<url_route>`` (same origin, scripts allowed, no pop-ups or top navigation — so every link on this page
stays inside the frame). Two views are registered:

* "LLM retraining" in the navigation bar (``/plugin/llm-retraining``): every use case;
* a "Model registry" tab on each DAG page (``/retrain/?dag_id=<DAG_ID>``): that use case only.

Routes (all behind Airflow's login — the same JWT cookie or bearer token the UI and REST API use):

* ``GET /retrain/``                 the HTML page (server-rendered, no JavaScript);
* ``GET /retrain/api/overview``     the same data as JSON;
* ``GET /retrain/files/<path>``     a report file under ``$RETRAIN_HOME/runs`` (HTML/Markdown/images/JSON only;
                                    never model weights or datasets), served with a CSP that blocks scripts
                                    because reports quote production text.

The page reads PostgreSQL (``model_versions``, ``pipeline_runs``) through ``retrain.db`` — the same connection
rules as the pipeline — per request, read-only. Nothing heavy is imported at module level: every Airflow
component that loads plugins imports this file.
"""

from __future__ import annotations

import logging
import mimetypes
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/retrain"
# Report-like files only: run directories also hold datasets (scrubbed production text) and model weights.
SERVED_SUFFIXES = {".html", ".htm", ".md", ".png", ".jpg", ".jpeg", ".svg", ".gif", ".json", ".css", ".txt",
                   ".csv", ".log",
                   # the Data Docs' own fonts and icon (retrain.data.datadocs vendors them: no CDN; never .js)
                   ".woff2", ".otf", ".ico"}
REPORT_CSP = ("sandbox allow-same-origin allow-downloads; script-src 'none'; object-src 'none'; "
              "default-src 'self' data:; style-src 'self' 'unsafe-inline'")
PAGE_CSP = "default-src 'self'; script-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"
RUNS_LIMIT = 40
HISTORY_LIMIT = 12

app = FastAPI(title="LLM retraining", docs_url=None, redoc_url=None, openapi_url=None)


# --------------------------------------------------------------------------------------------------------------
# Authentication: reuse Airflow's own (the UI's `_token` cookie, or `Authorization: Bearer` for scripts)


async def _authenticated(request: Request) -> bool:
    from fastapi.security import HTTPBearer

    from airflow.api_fastapi.core_api.security import get_user

    creds = await HTTPBearer(auto_error=False)(request)
    try:
        await get_user(request, None, creds)
    except HTTPException:
        return False
    return True


def _login_redirect(request: Request) -> RedirectResponse | JSONResponse:
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=307)
    except Exception:  # noqa: BLE001 - an auth manager without a login page: say so instead
        return JSONResponse({"detail": "Not authenticated: log in to Airflow first"}, status_code=401)


# --------------------------------------------------------------------------------------------------------------
# Data


def _use_cases() -> list[dict]:
    from retrain.schemas.use_case import load_use_case_file
    from retrain.settings import use_cases_dir

    out = []
    for path in sorted(use_cases_dir().glob("*.yaml")):
        try:
            uc = load_use_case_file(path)
        except Exception as exc:  # noqa: BLE001 - a broken file is shown on the page, not a 500
            out.append({"name": path.stem, "error": str(exc).splitlines()[0]})
            continue
        out.append({
            "name": uc.name,
            "dag_id": f"retrain_{uc.name}",
            "description": " ".join(uc.description.split()),
            "primary_label": uc.primary_label,
            "backend": uc.training.backend,
            "base_model": uc.training.base_model,
            "thresholds": uc.thresholds.model_dump(mode="json"),
            "approval": uc.approval,
        })
    return out


def _file_link(file: Path) -> str | None:
    """URL of a file of a run directory if it exists and lies under $RETRAIN_HOME/runs."""
    from retrain.settings import runs_dir

    root = runs_dir().resolve()
    path = Path(file).resolve()
    if not path.is_file() or not path.is_relative_to(root):
        return None
    return f"{URL_PREFIX}/files/{path.relative_to(root).as_posix()}"


def _reports(use_case: str, run_id: str | None, run_dir: str | None) -> dict[str, str]:
    from retrain.rundir import RunDir

    if not run_id and not run_dir:
        return {}
    rd = RunDir(run_dir) if run_dir else RunDir.for_run(use_case, run_id)
    links = {
        "report": _file_link(rd.report_html),
        "report (md)": _file_link(rd.report_md),
        "data docs": _file_link(rd.data_docs / "index.html"),
        "decision": _file_link(rd.decision),
        "sweep": _file_link(rd.sweep_report_md),
        "sweep plot": _file_link(rd.sweep_plot),
        "review tasks": _file_link(rd.review_export),  # Label Studio import file (retrain.review)
    }
    return {k: v for k, v in links.items() if v}


def _airflow_run_states(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Airflow's own state of each (dag_id, run_id), read from the metadata database of the API server this page
    runs in. A run killed or failed outside our stages (a worker lost, a task timed out, a run marked failed in
    the UI) never records its end in pipeline_runs: Airflow's word wins for it."""
    if not pairs:
        return {}
    try:
        from sqlalchemy import select, tuple_

        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        with create_session() as session:
            rows = session.execute(select(DagRun.dag_id, DagRun.run_id, DagRun.state)
                                   .where(tuple_(DagRun.dag_id, DagRun.run_id).in_(pairs))).all()
    except Exception as exc:  # noqa: BLE001 - the page still shows what pipeline_runs knows
        log.warning("retrain UI could not read Airflow's run states: %s", exc)
        return {}
    return {(dag_id, run_id): str(getattr(state, "value", state)) for dag_id, run_id, state in rows}


def _follow_airflow(runs_rows: list[dict]) -> None:
    """Runs still 'running' in pipeline_runs take Airflow's final state (failed or success) when it has one."""
    open_runs = [r for r in runs_rows if r.get("status") in (None, "running", "awaiting_approval")]
    states = _airflow_run_states([(f"retrain_{r['use_case']}", r["run_id"]) for r in open_runs])
    for r in open_runs:
        state = states.get((f"retrain_{r['use_case']}", r["run_id"]))
        if state in ("failed", "success"):
            r["status"], r["airflow_state"] = state, state


def overview(use_case: str | None = None) -> dict:
    """Everything the page shows, as a JSON-able dict (also served at /retrain/api/overview)."""
    from retrain import db
    from retrain.registry import runs
    from retrain.registry import store as registry

    use_cases = [u for u in _use_cases() if use_case is None or u["name"] == use_case]
    data: dict[str, Any] = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "use_case": use_case,
        "use_cases": use_cases,
        "registry": [],
        "runs": [],
        "error": None,
    }
    try:
        with db.connection() as conn:
            # Read-only page: on a fresh install the tables may not exist yet, which is not an error.
            has_registry, has_runs = db.tables_exist(conn, "model_versions", "pipeline_runs")
            if has_registry:
                data["registry"] = registry.recent_versions(conn, use_case, per_use_case=HISTORY_LIMIT)
            if has_runs:
                data["runs"] = runs.latest_runs(conn, RUNS_LIMIT, use_case)
            if data["runs"] and db.tables_exist(conn, "review_queue")[0]:
                from retrain.review.queue import counts as review_counts

                data["review_counts"] = review_counts(conn, [(r["use_case"], r["run_id"]) for r in data["runs"]])
    except Exception as exc:  # noqa: BLE001 - the page explains the problem instead of answering a bare 500
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        data["error"] = f"{first}" if "connect" in first else f"{type(exc).__name__}: {first}"
        log.warning("retrain UI could not read the registry: %s", data["error"])

    for r in data["registry"]:
        r.update(runs.decision_fields(r.get("decision")) if isinstance(r.get("decision"), dict) else {})
        r["reports"] = _reports(r["use_case"], r.get("run_id"), None)
    _follow_airflow(data["runs"])
    review_counts = data.pop("review_counts", {})
    for r in data["runs"]:
        r["reports"] = _reports(r["use_case"], r["run_id"], r.get("run_dir"))
        from retrain.review.workflow import ui_line  # active learning: REVIEW: n queued, top reasons

        r["review"] = ui_line(r.get("run_dir"), review_counts.get((r["use_case"], r["run_id"])))
        if r.get("status") == "awaiting_approval":  # a GO waiting for a reviewer (retrain.approval)
            from retrain.approval import ui_path

            r["approval_link"] = ui_path(f"retrain_{r['use_case']}", r["run_id"])
    production = {r["use_case"]: r for r in data["registry"] if r["status"] == "production"}
    latest_run: dict[str, dict] = {}
    for r in data["runs"]:
        latest_run.setdefault(r["use_case"], r)
    for u in use_cases:
        u["production"] = production.get(u["name"])
        u["latest_run"] = latest_run.get(u["name"])
    return data


# --------------------------------------------------------------------------------------------------------------
# Rendering helpers (used by the template)

# Shown first, in this order, when present (names from retrain.evaluate.metrics.compare); the rest follow alphabetically.
_SCORE_KEYS = ("primary_score", "score", "json_validity", "schema_validity", "entity_f1", "exact_match",
               "latency_p95", "train_loss", "eval_loss")


def _numeric_items(d: Any) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(d, dict) else {}


def metric_rows(metrics: Any, limit: int = 5) -> list[tuple[str, Any, Any]]:
    """(name, baseline, candidate) for the most telling metrics. Understands the evaluation's comparison
    ({name: {"baseline", "candidate", ...}}), {"baseline": {...}, "candidate": {...}}, a flat {name: value}
    and a registry candidate's {"training": {...}}."""
    if not isinstance(metrics, dict):
        return []
    per_metric = {k: v for k, v in metrics.items() if isinstance(v, dict) and ("baseline" in v or "candidate" in v)}
    if per_metric:
        base = _numeric_items({k: v.get("baseline") for k, v in per_metric.items()})
        cand = _numeric_items({k: v.get("candidate") for k, v in per_metric.items()})
    else:
        base, cand = _numeric_items(metrics.get("baseline")), _numeric_items(metrics.get("candidate"))
    if not base and not cand:
        cand = _numeric_items(metrics) or _numeric_items(metrics.get("training"))
    names = [k for k in _SCORE_KEYS if k in base or k in cand]
    names += sorted(k for k in {*base, *cand} if k not in names)
    return [(k, base.get(k), cand.get(k)) for k in names[:limit]]


def fmt_num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def fmt_seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def fmt_time(iso: str | None) -> str:
    if not iso:
        return "–"
    try:
        return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def validation_text(v: Any) -> tuple[str, str]:
    """(css class, text) for a pipeline_runs.validation value."""
    if v is None:
        return "muted", "–"
    if isinstance(v, bool):
        return ("ok", "passed") if v else ("bad", "failed")
    if isinstance(v, dict):
        ok = v.get("success")
        failed = v.get("failed") or []
        n = len(failed) if isinstance(failed, list) else 0
        if ok is True:
            return "ok", "passed"
        if ok is False:
            return "bad", f"failed ({n} expectation{'s' if n != 1 else ''})" if n else "failed"
    return "muted", str(v)[:60]


def decision_class(decision: str | None) -> str:
    d = (decision or "").upper()
    return "ok" if d == "GO" else "warn" if d in ("NO-GO", "NOGO", "NO_GO") else "muted"


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head>
<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>LLM retraining{% if use_case %} · {{ use_case }}{% endif %}</title>
<style>
 :root { --fg:#1a202c; --muted:#64748b; --line:#e2e8f0; --bg:#fff; --card:#f8fafc; --accent:#017cee;
         --ok:#15803d; --okbg:#dcfce7; --warn:#b45309; --warnbg:#fef3c7; --bad:#b91c1c; --badbg:#fee2e2;
         --info:#1d4ed8; --infobg:#dbeafe; }
 @media (prefers-color-scheme: dark) {
   :root { --fg:#e2e8f0; --muted:#94a3b8; --line:#334155; --bg:#0f172a; --card:#1e293b; --accent:#60a5fa;
           --okbg:#14532d; --ok:#bbf7d0; --warnbg:#78350f; --warn:#fde68a; --badbg:#7f1d1d; --bad:#fecaca;
           --infobg:#1e3a8a; --info:#bfdbfe; } }
 body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
        background: var(--bg); margin: 0; padding: 20px 24px 40px; }
 h1 { font-size: 20px; margin: 0 0 2px; } h2 { font-size: 16px; margin: 28px 0 8px; }
 h3 { font-size: 14px; margin: 18px 0 6px; }
 .sub { color: var(--muted); font-size: 12px; }
 a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
 table { border-collapse: collapse; width: 100%; font-size: 13px; }
 th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
 th { color: var(--muted); font-weight: 600; font-size: 12px; white-space: nowrap; }
 code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
 .cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
 .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
 .card h3 { margin: 0 0 4px; font-size: 15px; }
 .kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; font-size: 13px; margin-top: 8px; }
 .kv span:nth-child(odd) { color: var(--muted); }
 .badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600; }
 .ok { background: var(--okbg); color: var(--ok); } .warn { background: var(--warnbg); color: var(--warn); }
 .bad { background: var(--badbg); color: var(--bad); } .info { background: var(--infobg); color: var(--info); }
 .muted { color: var(--muted); }
 .banner { padding: 10px 14px; border-radius: 8px; margin: 12px 0; }
 ul.reasons { margin: 4px 0 0; padding-left: 18px; } ul.reasons li { margin: 0; }
 .metrics td, .metrics th { border: 0; padding: 0 10px 0 0; font-size: 12px; }
 .stages { color: var(--muted); font-size: 12px; }
 .links a { margin-right: 8px; white-space: nowrap; }
 .desc { color: var(--muted); font-size: 13px; }
</style></head>
<body>
<h1>LLM retraining{% if use_case %} · {{ use_case }}{% endif %}</h1>
<div class="sub">Production models, registry history and the latest monthly runs · generated {{ fmt_time(generated_at) }}
 · <a href="{{ prefix }}/api/overview{% if use_case %}?use_case={{ use_case }}{% endif %}">JSON</a>
 {% if use_case %}· <a href="{{ prefix }}/">all use cases</a>{% endif %}</div>

{% if not_retrain_dag %}
<div class="banner info">{{ not_retrain_dag }} is not a retraining DAG: there is no model registry for it.</div>
{% endif %}
{% if error %}
<div class="banner bad"><b>The registry database cannot be read:</b> {{ error }}<br>
Check the <code>retrain_db</code> Airflow connection or <code>RETRAIN_DATABASE_URL</code> of the API server.</div>
{% endif %}

<h2>Use cases</h2>
<div class="cards">
{% for u in use_cases %}
 <div class="card" id="uc-{{ u.name }}">
  <h3><a href="{{ prefix }}/?use_case={{ u.name }}">{{ u.name }}</a></h3>
  {% if u.error %}<div class="banner bad">invalid use-case file: {{ u.error }}</div>{% else %}
  <div class="desc">{{ u.description }}</div>
  <div class="kv">
   <span>DAG</span><span><code>{{ u.dag_id }}</code></span>
   <span>Production</span><span>
    {% if u.production %}<span class="badge ok">v{{ u.production.version }}</span>
      {{ u.production.backend }} · <code>{{ u.production.base_model }}</code>
      <div class="mono muted">{{ u.production.artifact }}</div>
    {% else %}<span class="muted">none yet (baseline = base model)</span>{% endif %}</span>
   {% if u.production %}<span>Since</span><span>{{ fmt_time(u.production.updated_at) }}</span>{% endif %}
   <span>Approval</span><span>{{ "a reviewer deploys each GO" if u.approval == "required" else "none (a GO deploys at once)" }}</span>
   <span>Gate</span><span>score ≥ {{ u.thresholds.min_score }}, +{{ (u.thresholds.min_relative_improvement * 100) | round(0) | int }}% vs baseline,
     JSON ≥ {{ u.thresholds.min_json_validity }}</span>
   <span>Last run</span><span>
    {% if u.latest_run %}<code>{{ u.latest_run.run_id }}</code><br>
      {% if u.latest_run.decision %}<span class="badge {{ decision_class(u.latest_run.decision) }}">{{ u.latest_run.decision }}</span>{% endif %}
      <span class="badge {{ status_class(u.latest_run.status) }}">{{ u.latest_run.status }}</span>
      {{ fmt_time(u.latest_run.started_at) }}
      {% if u.latest_run.approval_link %}<br><a class="approval" href="{{ u.latest_run.approval_link }}">Deploy or reject in Airflow</a>{% endif %}
    {% else %}<span class="muted">no run recorded</span>{% endif %}</span>
  </div>{% endif %}
 </div>
{% else %}<div class="muted">No use case matches.</div>
{% endfor %}
</div>

<h2>Latest runs</h2>
{% if runs %}
<table>
 <tr><th>Use case / run</th><th>Status</th><th>Rows</th><th>Validation</th><th>Metrics (baseline → candidate)</th>
     <th>Decision and reasons</th><th>Backup</th><th>Reports</th></tr>
 {% for r in runs %}
 <tr id="run-{{ loop.index }}">
  <td><b>{{ r.use_case }}</b><br><code>{{ r.run_id }}</code><br><span class="sub">{{ fmt_time(r.started_at) }}</span>
      <div class="stages">{% for s, sec in r.stages.items() %}{{ s }} {{ fmt_seconds(sec) }}{% if not loop.last %} · {% endif %}{% endfor %}
      {% if r.stages %}<br>total {{ fmt_seconds(r.total_seconds) }}{% endif %}</div></td>
  <td><span class="badge {{ status_class(r.status) }}">{{ r.status }}</span>
      {% if r.approval_link %}<div><a class="approval" href="{{ r.approval_link }}">Deploy or reject in Airflow</a></div>{% endif %}
      {% if r.error %}<div class="sub" style="max-width:260px">{{ r.error }}</div>{% endif %}</td>
  <td>{% if r.rows_collected is not none %}{{ r.rows_collected }} collected{% endif %}
      {% if r.rows_rejected is not none %}<br>{{ r.rows_rejected }} rejected{% endif %}</td>
  <td>{% set vc, vt = validation_text(r.validation) %}<span class="badge {{ vc }}">{{ vt }}</span></td>
  <td>{% set mr = metric_rows(r.metrics) %}{% if mr %}<table class="metrics">
      {% for name, b, c in mr %}<tr><th>{{ name }}</th><td>{{ fmt_num(b) }} → <b>{{ fmt_num(c) }}</b></td></tr>{% endfor %}
      </table>{% else %}<span class="muted">–</span>{% endif %}</td>
  <td>{% if r.decision %}<span class="badge {{ decision_class(r.decision) }}">{{ r.decision }}</span>
      {% if r.model_version %} → v{{ r.model_version }}{% endif %}{% else %}<span class="muted">–</span>{% endif %}
      {% if r.decision_reasons %}<ul class="reasons">{% for reason in r.decision_reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}
      {% if r.review %}<div class="sub review">{{ r.review }}</div>{% endif %}</td>
  <td>{% if r.backup_id %}<code>{{ r.backup_id }}</code>{% else %}<span class="muted">–</span>{% endif %}</td>
  <td class="links">{% for name, href in r.reports.items() %}<a href="{{ href }}">{{ name }}</a>{% else %}<span class="muted">–</span>{% endfor %}</td>
 </tr>
 {% endfor %}
</table>
{% else %}<div class="muted">No run recorded yet{% if use_case %} for {{ use_case }}{% endif %}.</div>{% endif %}

<h2>Model registry</h2>
{% for name, versions in registry_by_uc %}
 <h3>{{ name }}</h3>
 <table>
  <tr><th>Version</th><th>Status</th><th>Backend / base model</th><th>Artifact</th><th>Run</th><th>Metrics</th>
      <th>Decision</th><th>Created</th><th>Reports</th></tr>
  {% for v in versions %}
  <tr>
   <td><b>v{{ v.version }}</b></td>
   <td><span class="badge {{ status_class(v.status) }}">{{ v.status }}</span></td>
   <td>{{ v.backend }}<br><code>{{ v.base_model }}</code></td>
   <td class="mono" style="max-width:280px; word-break:break-all">{{ v.artifact }}</td>
   <td><code>{{ v.run_id or "–" }}</code></td>
   <td>{% set mr = metric_rows(v.metrics, 3) %}{% for n, b, c in mr %}{{ n }} <b>{{ fmt_num(c) }}</b>{% if b is not none %} <span class="muted">(baseline {{ fmt_num(b) }})</span>{% endif %}<br>{% else %}<span class="muted">–</span>{% endfor %}</td>
   <td>{% if v.get("decision") is string %}<span class="badge {{ decision_class(v.decision) }}">{{ v.decision }}</span>
       {% if v.decision_reasons %}<ul class="reasons">{% for reason in v.decision_reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}
       {% else %}<span class="muted">–</span>{% endif %}</td>
   <td>{{ fmt_time(v.created_at) }}</td>
   <td class="links">{% for n, href in v.reports.items() %}<a href="{{ href }}">{{ n }}</a>{% else %}<span class="muted">–</span>{% endfor %}</td>
  </tr>
  {% endfor %}
 </table>
{% else %}<div class="muted">The registry is empty: a model is registered when a run passes the gate.</div>
{% endfor %}
</body></html>
"""


def status_class(status: str | None) -> str:
    return {"production": "ok", "success": "ok", "candidate": "info", "running": "info", "rejected": "bad",
            "failed": "bad", "no_go": "warn", "retired": "muted", "dry_run": "muted",
            "awaiting_approval": "warn"}.get(status or "", "muted")


def render_page(data: dict, not_retrain_dag: str | None = None) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    registry_by_uc: dict[str, list] = {}
    for v in data["registry"]:
        registry_by_uc.setdefault(v["use_case"], []).append(v)
    return env.from_string(_TEMPLATE).render(
        **data, prefix=URL_PREFIX, registry_by_uc=list(registry_by_uc.items()), not_retrain_dag=not_retrain_dag,
        fmt_time=fmt_time, fmt_num=fmt_num, fmt_seconds=fmt_seconds, metric_rows=metric_rows,
        validation_text=validation_text, decision_class=decision_class, status_class=status_class,
    )


# --------------------------------------------------------------------------------------------------------------
# Routes


@app.get("/", response_class=HTMLResponse)
async def page(request: Request, use_case: str | None = None, dag_id: str | None = None):
    if not await _authenticated(request):
        return _login_redirect(request)
    from starlette.concurrency import run_in_threadpool

    foreign = None
    if dag_id:  # opened as the "Model registry" tab of a DAG page
        if dag_id.startswith("retrain_"):
            use_case = dag_id.removeprefix("retrain_")
        else:
            foreign = dag_id
    if foreign:
        data = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "use_case": None,
                "use_cases": [], "registry": [], "runs": [], "error": None}
    else:
        data = await run_in_threadpool(overview, use_case or None)
    html = render_page(data, not_retrain_dag=foreign)
    return HTMLResponse(html, status_code=503 if data["error"] else 200,
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})


@app.get("/api/overview")
async def api_overview(request: Request, use_case: str | None = None):
    if not await _authenticated(request):
        raise HTTPException(status_code=401, detail="Not authenticated: send the Airflow JWT as a bearer token")
    from starlette.concurrency import run_in_threadpool

    data = await run_in_threadpool(overview, use_case or None)
    return JSONResponse(data, status_code=503 if data["error"] else 200)


@app.get("/files/{rel_path:path}")
async def run_file(request: Request, rel_path: str):
    if not await _authenticated(request):
        return _login_redirect(request)
    from retrain.settings import runs_dir

    root = runs_dir().resolve()
    # resolve() follows symlinks and '..': whatever the request says, the file must end up under runs/.
    path = (root / rel_path).resolve()
    if not path.is_relative_to(root) or path == root:
        raise HTTPException(status_code=404, detail="only files under $RETRAIN_HOME/runs are served")
    if path.is_dir() and (path / "index.html").is_file():
        path = path / "index.html"
    if path.suffix.lower() not in SERVED_SUFFIXES:
        raise HTTPException(status_code=404, detail=f"only report files ({', '.join(sorted(SERVED_SUFFIXES))}) "
                                                    f"are served, not {path.suffix or 'directories'}")
    if not path.is_file():
        raise HTTPException(status_code=404, detail=f"{rel_path} does not exist (cleaned up after backup?)")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix.lower() in (".md", ".log", ".csv", ".txt"):
        media = "text/plain; charset=utf-8"
    return FileResponse(path, media_type=media, headers={
        "Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


class RetrainUIPlugin(AirflowPlugin):
    name = "retrain_ui"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "LLM retraining"}]
    external_views = [
        {
            "name": "LLM retraining",
            "href": f"{URL_PREFIX}/",
            "url_route": "llm-retraining",
            "destination": "nav",
            "category": "browse",
        },
        {
            "name": "Model registry",
            "href": f"{URL_PREFIX}/?dag_id={{DAG_ID}}",
            "url_route": "retrain-registry",
            "destination": "dag",
        },
    ]
