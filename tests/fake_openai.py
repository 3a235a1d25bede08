"""A small OpenAI-compatible HTTP server for tests (no network here; the real `openai` client talks to it).

Implements the parts of the API the platform uses:

* ``POST /v1/files`` (multipart, purpose ``fine-tune``; the bytes are kept so tests can scan what left),
  ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``;
* ``POST /v1/fine_tuning/jobs`` (checks that the training/validation files exist and were uploaded for
  fine-tuning), ``GET /v1/fine_tuning/jobs/{id}`` with the real state progression
  ``validating_files -> queued -> running -> succeeded`` (driven by retrieve calls or elapsed time),
  ``GET /v1/fine_tuning/jobs`` (newest first, cursor pagination, ``metadata[k]=v`` and ``suffix`` filters),
  ``GET /v1/fine_tuning/jobs/{id}/events`` (newest first), ``POST /v1/fine_tuning/jobs/{id}/cancel``;
* ``POST /v1/chat/completions`` answering with a configurable function of the request. By default a
  fine-tuned model (``ft:...``, created by a job here) answers from what its job's training file taught it
  (see ``LearnedModel``) and any other model answers ``base_model_answer``: an untuned model that does not
  know the task. ``learned_share(hyperparameters) -> float`` makes a job's hyper-parameters matter: its model learns
  only that share of the training file (0: nothing, it answers like the base model), e.g. to give the candidates of
  a sweep different validation scores.

Failure modes: a job can be made to fail with an OpenAI error object (``fail_jobs_with``), a training file
that is not chat JSONL fails validation the way OpenAI does, and any route can answer 429/500 to its first N
requests (``fail_first``). Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.

Usage::

    fake = FakeOpenAI(polls_per_state=1)
    base_url, stop = fake.start()          # thread on 127.0.0.1, random port
    ...
    stop()

or ``base_url, stop = start(port=0, **options)`` with the server object at ``stop.fake``.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import math
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

ACTIVE = ("validating_files", "queued", "running")
PROGRESSION = ("validating_files", "queued", "running", "succeeded")
TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _chat_messages_ok(raw: bytes) -> str | None:
    """What OpenAI's file validation would say about a training file, or None when it is usable."""
    lines = [ln for ln in raw.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        return "Training file is empty."
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return f"Invalid file format. Line {n} is not valid JSON."
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            return f"Invalid file format. Line {n}, key \"messages\": missing or not a list."
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in row["messages"]):
            return f"Invalid file format. Line {n}: examples must contain at least one assistant message."
    return None


def _chat_pairs(raw: bytes | str) -> list[tuple[str, str]]:
    """(last user message, last assistant message) of every example of a chat JSONL."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    pairs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        msgs = json.loads(line).get("messages", [])
        user = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), None)
        gold = next((m["content"] for m in reversed(msgs) if m.get("role") == "assistant"), None)
        if user is not None and gold is not None:
            pairs.append((user, gold))
    return pairs


_WORD = re.compile(r"\w+")


class LearnedModel:
    """What a fake fine-tuned model "learned" from its job's training file, and nothing else.

    A prompt seen in training gets its training answer back; an unseen prompt gets the answer of its nearest
    training prompts (IDF-weighted word overlap; the intent the 3 nearest agree on most, ties to the nearest).
    Deterministic, and honest about generalisation: it never sees the test set, so its score on the test set
    is what a model that learned the training data's word/label association would get. On this platform's
    synthetic data (labels are a function of cue words) that is about 0.9 intent accuracy.
    """

    K = 3

    def __init__(self, training_jsonl: bytes | str, *, vote_field: str | None = "intent_type"):
        self.exact: dict[str, str] = {}
        self.examples: list[tuple[frozenset[str], str]] = []
        for user, gold in _chat_pairs(training_jsonl):
            self.exact[user] = gold
            self.examples.append((frozenset(_WORD.findall(user.lower())), gold))
        df = Counter(w for words, _ in self.examples for w in words)
        n = max(1, len(self.examples))
        self.idf = {w: math.log(n / c) for w, c in df.items()}
        self.unknown_idf = math.log(n) if n > 1 else 1.0
        self.vote_field = vote_field

    def _similarity(self, query: frozenset[str], words: frozenset[str]) -> float:
        union = sum(self.idf.get(w, self.unknown_idf) for w in query | words)
        return sum(self.idf[w] for w in query & words) / union if union else 0.0

    def answer(self, user: str) -> str | None:
        if user in self.exact:
            return self.exact[user]
        if not self.examples:
            return None
        query = frozenset(_WORD.findall(user.lower()))
        ranked = sorted(range(len(self.examples)), key=lambda i: -self._similarity(query, self.examples[i][0]))
        nearest = [self.examples[i][1] for i in ranked[: self.K]]
        if self.vote_field is None:
            return nearest[0]

        def label(answer: str):
            try:
                return json.loads(answer).get(self.vote_field)
            except (ValueError, AttributeError):
                return None

        votes = Counter(label(a) for a in nearest)
        best = max(votes.values())
        return next(a for a in nearest if votes[label(a)] == best)  # nearest answer with the winning label


class FakeOpenAI:
    """State and behaviour of the fake API. All knobs are plain attributes, changeable while it runs."""

    def __init__(
        self,
        *,
        api_key: str | None = "sk-test-fake",
        progression: str = "polls",
        polls_per_state: int = 1,
        seconds_per_state: float = 0.2,
        fail_jobs_with: dict | None = None,
        fail_at: str = "running",
        chat: Callable[[str, list[dict]], str] | None = None,
        base_model_answer: str = '{"answer": "unknown"}',
        chat_latency: float = 0.0,
        organization: str = "org-fake",
        learned_share: Callable[[dict], float] | None = None,
    ):
        if progression not in ("polls", "time"):
            raise ValueError("progression must be 'polls' (each retrieve advances) or 'time' (seconds_per_state)")
        self.api_key = api_key  # None: accept any (or no) key
        self.progression = progression
        self.polls_per_state = polls_per_state
        self.seconds_per_state = seconds_per_state
        self.fail_jobs_with = fail_jobs_with  # {"code", "message", "param"?}: jobs created from now on fail
        self.fail_at = fail_at  # state in which they fail: "validating_files" | "queued" | "running"
        self.chat = chat  # (model, messages) -> assistant content; None = the default below (chat_completions)
        self.answers: dict[str, str] = {}  # user message -> answer a test registers for every fine-tuned model
        self.models: dict[str, LearnedModel] = {}  # fine-tuned model id -> what its training file taught it
        self.base_model_answer = base_model_answer
        self.chat_latency = chat_latency
        self.organization = organization
        self.learned_share = learned_share  # job hyperparameters -> share of the training file its model learns
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, route, status) of every request
        self.auth_headers: list[str] = []
        self._fail_first: dict[str, list] = {}  # route -> [remaining, status]
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self.base_url: str | None = None

    # --- knobs -------------------------------------------------------------------------------------------

    def fail_first(self, route: str, n: int, status: int = 429, *, after_processing: bool = False) -> None:
        """Answer the next ``n`` requests of ``route`` (e.g. "GET /v1/fine_tuning/jobs/{id}") with ``status``.

        ``after_processing``: do the work first, then answer with the error (a job that was created although
        the client saw a 500: what makes blind retries of a create dangerous)."""
        with self._lock:
            self._fail_first[route] = [n, status, after_processing]

    def learn(self, jsonl: str | bytes) -> int:
        """Make every fine-tuned model answer each user message of a chat JSONL with its assistant message
        (an explicit registration by a test; jobs teach their own model through ``LearnedModel``)."""
        pairs = _chat_pairs(jsonl)
        with self._lock:
            self.answers.update(pairs)
        return len(pairs)

    def uploaded_bytes(self) -> bytes:
        with self._lock:
            return b"\n".join(f["bytes"] for f in self.files.values())

    def count(self, method: str, route: str) -> int:
        return sum(1 for m, r, _ in self.requests if m == method and r == route)

    # --- server ------------------------------------------------------------------------------------------

    def start(self, port: int = 0) -> tuple[str, Callable[[], None]]:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        thread.start()
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

        def stop() -> None:
            if self._httpd is not None:
                self._httpd.shutdown()
                self._httpd.server_close()
                thread.join(timeout=5)
                self._httpd = None

        stop.fake = self  # type: ignore[attr-defined]
        return self.base_url, stop

    # --- routing -----------------------------------------------------------------------------------------

    ROUTES = [
        ("POST", re.compile(r"^/v1/files$"), "/v1/files", "create_file"),
        ("GET", re.compile(r"^/v1/files/(?P<id>[^/]+)$"), "/v1/files/{id}", "get_file"),
        ("GET", re.compile(r"^/v1/files/(?P<id>[^/]+)/content$"), "/v1/files/{id}/content", "file_content"),
        ("POST", re.compile(r"^/v1/fine_tuning/jobs$"), "/v1/fine_tuning/jobs", "create_job"),
        ("GET", re.compile(r"^/v1/fine_tuning/jobs$"), "/v1/fine_tuning/jobs", "list_jobs"),
        ("GET", re.compile(r"^/v1/fine_tuning/jobs/(?P<id>[^/]+)$"), "/v1/fine_tuning/jobs/{id}", "get_job"),
        ("GET", re.compile(r"^/v1/fine_tuning/jobs/(?P<id>[^/]+)/events$"), "/v1/fine_tuning/jobs/{id}/events",
         "job_events"),
        ("POST", re.compile(r"^/v1/fine_tuning/jobs/(?P<id>[^/]+)/cancel$"), "/v1/fine_tuning/jobs/{id}/cancel",
         "cancel_job"),
        ("POST", re.compile(r"^/v1/chat/completions$"), "/v1/chat/completions", "chat_completions"),
    ]

    def dispatch(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, Any, dict]:
        for m, pattern, route, name in self.ROUTES:
            match = pattern.match(path)
            if m != method or not match:
                continue
            try:
                with self._lock:
                    self.auth_headers.append(headers.get("Authorization", ""))
                    if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
                        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
                    rule = self._fail_first.get(f"{method} {route}")
                    failure = None
                    if rule and rule[0] > 0:
                        rule[0] -= 1
                        if rule[1] == 429:
                            failure = ApiError(429, "Rate limit reached for requests", type_="requests",
                                               code="rate_limit_exceeded", headers={"retry-after-ms": "10"})
                        else:
                            failure = ApiError(rule[1], "The server had an error while processing your request. "
                                               "Sorry!", type_="server_error")
                        if not rule[2]:
                            raise failure
                result = getattr(self, name)(query=query, headers=headers, body=body, **match.groupdict())
                if failure is not None:
                    raise failure
                status = 200
                self.requests.append((method, route, status))
                return status, result, {}
            except ApiError as exc:
                self.requests.append((method, route, exc.status))
                return exc.status, exc.body(), exc.headers
        self.requests.append((method, path, 404))
        return 404, ApiError(404, f"Unknown request URL: {method} {path}.", code="unknown_url").body(), {}

    # --- files -------------------------------------------------------------------------------------------

    def create_file(self, *, headers, body, **_):
        ctype = headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "Expected multipart/form-data with fields 'file' and 'purpose'.")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + body
        )
        fields: dict[str, Any] = {}
        filename = None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                filename = part.get_filename()
            fields[name] = part.get_payload(decode=True)
        if "file" not in fields:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        purpose = (fields.get("purpose") or b"").decode()
        if purpose not in ("fine-tune", "batch", "assistants", "vision", "user_data", "evals"):
            raise ApiError(400, f"'{purpose}' is not one of the supported purposes.", param="purpose")
        with self._lock:
            fid = f"file-{uuid.uuid4().hex[:24]}"
            self.files[fid] = {"bytes": fields["file"], "filename": filename or "upload", "purpose": purpose,
                               "created_at": int(time.time())}
            return self._file_obj(fid)

    def _file_obj(self, fid: str) -> dict:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["bytes"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None}

    def _file(self, fid: str, param: str = "file_id") -> dict:
        if fid not in self.files:
            raise ApiError(404, f"No such File object: {fid}", param=param, code="file_not_found")
        return self.files[fid]

    def get_file(self, *, id, **_):  # noqa: A002 - the route's name
        with self._lock:
            self._file(id)
            return self._file_obj(id)

    def file_content(self, *, id, **_):  # noqa: A002
        with self._lock:
            return RawBody(self._file(id)["bytes"])

    # --- fine-tuning jobs ---------------------------------------------------------------------------------

    def create_job(self, *, body, **_):
        req = json.loads(body or b"{}")
        model = req.get("model")
        if not model:
            raise ApiError(400, "Missing required parameter: 'model'.", param="model")
        with self._lock:
            for key in ("training_file", "validation_file"):
                fid = req.get(key)
                if key == "training_file" and not fid:
                    raise ApiError(400, "Missing required parameter: 'training_file'.", param=key)
                if fid is None:
                    continue
                if fid not in self.files:
                    raise ApiError(400, f"invalid {key}: {fid}", param=key, code="invalid_file_id")
                if self.files[fid]["purpose"] != "fine-tune":
                    raise ApiError(400, f"File {fid} was not uploaded with purpose 'fine-tune'.", param=key)
            metadata = req.get("metadata") or {}
            if len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
                raise ApiError(400, "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters.",
                               param="metadata")
            suffix = req.get("suffix")
            if suffix is not None and len(suffix) > 64:
                raise ApiError(400, "suffix must be at most 64 characters.", param="suffix")
            hp = dict(req.get("hyperparameters") or {})
            method = req.get("method") or {"type": "supervised", "supervised": {"hyperparameters": hp}}
            hp.update(((method.get("supervised") or {}).get("hyperparameters")) or {})
            hp = {"n_epochs": hp.get("n_epochs", "auto"), "batch_size": hp.get("batch_size", "auto"),
                  "learning_rate_multiplier": hp.get("learning_rate_multiplier", "auto")}
            jid = f"ftjob-{uuid.uuid4().hex[:24]}"
            job = {
                "id": jid, "object": "fine_tuning.job", "model": model, "created_at": int(time.time()),
                "order": next(self._ids), "finished_at": None, "fine_tuned_model": None,
                "organization_id": self.organization, "result_files": [], "status": "validating_files",
                "validation_file": req.get("validation_file"), "training_file": req["training_file"],
                "hyperparameters": hp, "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
                "trained_tokens": None, "error": None, "seed": req.get("seed") if req.get("seed") is not None
                else 1234, "user_provided_suffix": suffix, "metadata": metadata or None,
                "estimated_finish": None, "integrations": [],
                # private bookkeeping, stripped from responses
                "_polls": 0, "_t0": time.monotonic(), "_events": [],
                "_fail": dict(self.fail_jobs_with) if self.fail_jobs_with else None, "_fail_at": self.fail_at,
            }
            self.jobs[jid] = job
            self._event(job, f"Validating training file: {job['training_file']}")
            return self._job_obj(job)

    def _event(self, job: dict, message: str, level: str = "info", data: dict | None = None) -> None:
        job["_events"].append({"object": "fine_tuning.job.event", "id": f"ftevent-{uuid.uuid4().hex[:24]}",
                               "created_at": int(time.time()), "seq": next(self._clock), "level": level,
                               "message": message, "data": data or {}, "type": "metrics" if data else "message"})

    def _job_obj(self, job: dict) -> dict:
        return {k: v for k, v in job.items() if not k.startswith("_") and k != "order"}

    def _advance(self, job: dict, poll: bool) -> None:
        """Move a job along validating_files -> queued -> running -> succeeded (or fail/cancel)."""
        if job["status"] in TERMINAL:
            return
        if poll:
            job["_polls"] += 1
        if self.progression == "polls":
            target = job["_polls"] // max(1, self.polls_per_state)
        else:
            target = int((time.monotonic() - job["_t0"]) / max(1e-6, self.seconds_per_state))
        while job["status"] not in TERMINAL and PROGRESSION.index(job["status"]) < min(target, 3):
            self._step(job)

    def _step(self, job: dict) -> None:
        status = job["status"]
        if job["_fail"] and job["_fail_at"] == status:
            self._finish_failed(job, job["_fail"])
            return
        if status == "validating_files":
            problem = _chat_messages_ok(self.files[job["training_file"]]["bytes"])
            if problem:
                self._finish_failed(job, {"code": "invalid_training_file", "message": problem,
                                          "param": "training_file"})
                return
            job["status"] = "queued"
            self._event(job, "Files validated, moving job to queued state")
        elif status == "queued":
            job["status"] = "running"
            job["estimated_finish"] = int(time.time()) + 60
            self._event(job, "Fine-tuning job started")
        elif status == "running":
            steps = 3
            for step in range(1, steps + 1):
                self._event(job, f"Step {step}/{steps}: training loss={1.5 / step:.2f}",
                            data={"step": step, "train_loss": round(1.5 / step, 3), "total_steps": steps})
            n_epochs = job["hyperparameters"]["n_epochs"]
            n_epochs = n_epochs if isinstance(n_epochs, int) else 3
            tokens = len(self.files[job["training_file"]]["bytes"]) // 4
            suffix = job["user_provided_suffix"] or ""
            job.update(status="succeeded", finished_at=int(time.time()), trained_tokens=tokens * n_epochs,
                       fine_tuned_model=f"ft:{job['model']}:{self.organization}:{suffix}:{job['id'][-8:]}",
                       result_files=[f"file-result-{job['id'][-8:]}"], estimated_finish=None)
            # The "fine-tuned model" learns from the training file only, like OpenAI's (the validation file
            # only feeds the validation loss); chat_completions answers with it.
            training = self.files[job["training_file"]]["bytes"]
            if self.learned_share is not None:
                lines = training.splitlines(keepends=True)
                share = min(1.0, max(0.0, float(self.learned_share(dict(job["hyperparameters"])))))
                training = b"".join(lines[: round(share * len(lines))])
            self.models[job["fine_tuned_model"]] = LearnedModel(training)
            self._event(job, f"New fine-tuned model created: {job['fine_tuned_model']}")
            self._event(job, "The job has successfully completed")

    def _finish_failed(self, job: dict, error: dict) -> None:
        err = {"code": error.get("code", "server_error"), "message": error.get("message", "failed"),
               "param": error.get("param")}
        job.update(status="failed", finished_at=int(time.time()), error=err, estimated_finish=None)
        self._event(job, f"Fine-tuning job failed: {err['message']}", level="error")

    def _job(self, jid: str) -> dict:
        if jid not in self.jobs:
            raise ApiError(404, f"Could not find fine tune: {jid}", param="fine_tune_id", code="fine_tune_not_found")
        return self.jobs[jid]

    def get_job(self, *, id, **_):  # noqa: A002
        with self._lock:
            job = self._job(id)
            self._advance(job, poll=True)
            return self._job_obj(job)

    def list_jobs(self, *, query, **_):
        with self._lock:
            jobs = sorted(self.jobs.values(), key=lambda j: j["order"], reverse=True)
            for job in jobs:
                self._advance(job, poll=False)
            meta = {k[len("metadata["):-1]: v for k, v in query.items() if k.startswith("metadata[")}
            if meta:
                jobs = [j for j in jobs if all((j["metadata"] or {}).get(k) == v for k, v in meta.items())]
            if "suffix" in query:
                jobs = [j for j in jobs if j["user_provided_suffix"] == query["suffix"]]
            if query.get("after"):
                ids = [j["id"] for j in jobs]
                jobs = jobs[ids.index(query["after"]) + 1:] if query["after"] in ids else []
            limit = int(query.get("limit", 20))
            return {"object": "list", "data": [self._job_obj(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}

    def job_events(self, *, id, query, **_):  # noqa: A002
        with self._lock:
            job = self._job(id)
            self._advance(job, poll=False)
            events = sorted(job["_events"], key=lambda e: e["seq"], reverse=True)
            if query.get("after"):
                ids = [e["id"] for e in events]
                events = events[ids.index(query["after"]) + 1:] if query["after"] in ids else []
            limit = int(query.get("limit", 20))
            data = [{k: v for k, v in e.items() if k != "seq"} for e in events[:limit]]
            return {"object": "list", "data": data, "has_more": len(events) > limit}

    def cancel_job(self, *, id, **_):  # noqa: A002
        with self._lock:
            job = self._job(id)
            self._advance(job, poll=False)
            if job["status"] in TERMINAL:
                raise ApiError(400, f"Job {id} has already {job['status']} and cannot be cancelled.",
                               code="invalid_state")
            job.update(status="cancelled", finished_at=int(time.time()), estimated_finish=None)
            self._event(job, "Fine-tuning job cancelled")
            return self._job_obj(job)

    # --- chat ----------------------------------------------------------------------------------------------

    def chat_completions(self, *, body, **_):
        req = json.loads(body or b"{}")
        model, messages = req.get("model"), req.get("messages")
        if not model or not isinstance(messages, list) or not messages:
            raise ApiError(400, "'model' and a non-empty 'messages' list are required.", param="messages")
        with self._lock:
            learned = self.models.get(model)
            if model.startswith("ft:") and learned is None:
                # Only a succeeded job's model exists (a cancelled or failed job leaves none behind).
                raise ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
        if self.chat_latency:
            time.sleep(self.chat_latency)
        if self.chat is not None:
            content = self.chat(model, messages)
        elif learned is not None:
            user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
            content = self.answers.get(user) or learned.answer(user) or self.base_model_answer
        else:
            content = self.base_model_answer
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        completion_tokens = len(content) // 4 + 1
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": None}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
    """Answer ``payload`` as JSON with ``status`` (the small fake servers in tests/ share it as their ``_send``)."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class RawBody(bytes):
    """A response body sent as-is (file content) instead of JSON."""


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        status, payload, extra = self.fake.dispatch(method, parts.path, query, self.headers, body)
        if isinstance(payload, RawBody):
            data, ctype = bytes(payload), "application/octet-stream"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")


def start(port: int = 0, **options) -> tuple[str, Callable[[], None]]:
    """Start a FakeOpenAI(**options) on 127.0.0.1 in a thread; ``stop.fake`` is the server object."""
    return FakeOpenAI(**options).start(port)
