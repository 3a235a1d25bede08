"""The UI as a person sees it, in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

* Data Docs work offline: no external URL in any generated page; opened from file:// the index lists the
  validation runs (bootstrap-table from the vendored copies, no network), and served by the UI plugin under its
  script-free Content-Security-Policy the index still lists them (as plain HTML rows) and the validation page is
  styled by the vendored Bootstrap.
* The whole path through a real Airflow 3 (`retrain stack`: api-server, scheduler, dag-processor, Celery workers):
  log in, open retrain_product_intent, the trigger form renders every Param as the right widget, trigger a dry run,
  see it succeed in the grid, open the "LLM retraining" page and follow its Data Docs link.

Screenshots go to tests/artifacts/ (the best ones are copied to docs/screenshots/ by hand for the README).
Playwright's own browser downloads are never used (`playwright install` is not needed): only executable_path.
"""

from __future__ import annotations

import html.parser
import importlib.util
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from retrain.data.datadocs import EXTERNAL
from retrain.data.validate import DataValidationError, validate_dataset
from retrain.schemas.use_case import load_use_case
from retrain.settings import runs_dir
from stack_helpers import DAG_ID, api, stack  # noqa: F401 - fixtures (the stack starts only for the last test)
from test_validate import clean_rows, write_run_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
MAX_PNG = 300_000

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or importlib.util.find_spec("playwright") is None,
    reason="needs Debian's chromium (apt-get install -y chromium; .ci/run does it) and the playwright package "
           "(requirements.txt); never `playwright install`")


# --- a Data Docs site as validate_dataset writes it -------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> Path:
    """A run directory under $RETRAIN_HOME/runs (so the plugin serves it) validated twice: one failed attempt
    (a test row leaks into train: the dataset suite fails) then the fixed data, like a person re-running it."""
    uc = load_use_case("product_intent")
    # Under $RETRAIN_HOME/runs (the plugin serves nothing else), apart from the use cases' own run directories.
    run = runs_dir() / "_browser_test" / "manual__2026-12-01T09_00_00_00_00"
    rows = clean_rows(120)
    bad = list(rows)
    bad[9] = (rows[0][0], rows[0][1])  # row 9 is a test row; its input is also train row 0's
    write_run_dir(run, uc, bad)
    with pytest.raises(DataValidationError):
        validate_dataset(run, uc)
    failed_docs = run.parent / "failed_attempt_docs"
    shutil.rmtree(failed_docs, ignore_errors=True)
    shutil.copytree(run / "data_docs", failed_docs)
    write_run_dir(run, uc, rows)
    validate_dataset(run, uc)
    return run / "data_docs"


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "action", "formaction", "poster", "data") and value:
                self.refs.append((tag, name, value))
            if name == "style" and value:
                self.styles.append(value)
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def _pages(root: Path) -> list[Path]:
    return sorted(root.rglob("*.html"))


def test_generated_data_docs_reference_nothing_outside_the_site(docs):
    for site in (docs, docs.parent.parent / "failed_attempt_docs"):
        pages = _pages(site)
        assert {p.relative_to(site).parts[0] for p in pages} >= {"index.html", "validations", "expectations"}
        for page in pages:
            text = page.read_text(encoding="utf-8")
            # The synthetic rows quote no URL, so any http(s):// at all is GX's (scripts, logo, links, newsletter).
            assert not re.search(r"https?://", text), (page, re.findall(r".{40}https?://.{60}", text)[:3])
            parser = _Refs()
            parser.feed(text)
            for tag, attr, value in parser.refs:
                assert not EXTERNAL.match(value), (page, tag, attr, value)
                target = value.split("#")[0].split("?")[0]
                if target:  # every relative reference resolves to a file of the site
                    resolved = (page.parent / target).resolve()
                    assert resolved.is_file() and resolved.is_relative_to(site.resolve()), (page, tag, attr, value)
            for css in parser.styles:
                for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", css):
                    assert url.startswith("data:") or not EXTERNAL.match(url), (page, url)
        # The vendored assets travel with the run (and its backup), licences included in the repository.
        for asset in ("jquery.min.js", "bootstrap.min.css", "bootstrap-table.min.js", "fontawesome/css/all.min.css",
                      "fontawesome/webfonts/fa-solid-900.woff2"):
            assert (site / "static" / "vendor" / asset).is_file(), asset


def test_unknown_external_assets_are_dropped_and_known_ones_vendored():
    """A newer GX template may reference something not vendored yet: it must not be loaded from the internet."""
    from retrain.data.datadocs import rewrite_page

    page = """<html><head>
<script src="https://code.jquery.com/jquery-3.7.1.min.js" integrity="sha384-x" crossorigin="anonymous"></script>
<script src="https://cdn.example.com/new-lib@2/lib.min.js"></script>
<link rel="stylesheet" href="//cdn.example.com/new.css">
<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>
<style>.x { background: url('https://evil.example/track.gif') } .y { background: url(https://a.b/logo.png) }</style>
<link rel="shortcut icon" href="../../static/images/favicon.ico"/>
</head><body><img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1">
<a href="https://greatexpectations.io">Great Expectations</a> <a href="#top">top</a>
<footer>
  <p>Stay current on everything GX with our newsletter <a href="https://x">Subscribe</a></p>
</footer></body></html>"""
    out = rewrite_page(page, "../../..")
    assert "http" not in out and "//cdn" not in out, out
    assert '<script src="../../../static/vendor/jquery.min.js"></script>' in out  # no integrity/crossorigin
    assert 'src="../../../static/images/logo-long.png"' in out and "url('../../../static/images/logo-long.png')" in out
    assert "url(none)" not in out and "background: none" in out
    assert 'href="../../../static/images/favicon.ico"' in out  # GX's one-level-short path, corrected
    assert "<a>Great Expectations</a>" in out and '<a href="#top">top</a>' in out and "newsletter" not in out
    assert "<noscript>" in out


# --- the browser ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Offline:
    """Every request a page makes; anything not served by localhost or file:// is refused and recorded."""

    def __init__(self, context):
        self.outside: list[str] = []
        self.requests: list[str] = []
        context.route("**/*", self._route)

    def _route(self, route):
        url = route.request.url
        self.requests.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("file", "data", "blob") or parts.hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()


def _shot(page, name: str, *, full_page: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / name
    page.screenshot(path=str(out), full_page=full_page, type="png")
    if full_page and out.stat().st_size > MAX_PNG:  # a long page: keep the first screen only
        page.screenshot(path=str(out), full_page=False, type="png")
    assert out.stat().st_size <= MAX_PNG, (name, out.stat().st_size)
    return out


def _settle(frame) -> list[str]:
    """Wait until the page is loaded and its fonts are in; the statuses of the Font Awesome faces it loaded
    (empty when the icon font is missing: the status icons would be blank squares or nothing)."""
    frame.wait_for_load_state("load")
    return frame.evaluate("""async () => {
        const faces = await document.fonts.load('900 16px "Font Awesome 6 Free"', '\\uf058');
        await document.fonts.ready;
        return faces.map(f => f.status);
    }""")


def _is_bootstrap_styled(page) -> dict:
    """Computed styles that only Bootstrap 4 (from the vendored CSS) produces, not the browser defaults."""
    return page.evaluate("""() => {
        const body = getComputedStyle(document.body);
        const table = document.querySelector('table.table');
        const cell = table && table.querySelector('td');
        return {
            font: body.fontFamily,                   // Bootstrap: -apple-system, ... ; default: Times New Roman
            margin: body.margin,                     // Bootstrap's reboot: 0px; default: 8px
            table_width: table ? getComputedStyle(table).width === getComputedStyle(table.parentElement).width : null,
            cell_padding: cell ? getComputedStyle(cell).paddingTop : null,   // .table td: 0.75rem/0.3rem; default 1px
        };
    }""")


def _assert_styled(styles: dict) -> None:
    assert "Times" not in styles["font"] and styles["margin"] == "0px", styles
    assert styles["cell_padding"] not in (None, "0px", "1px"), styles


@needs_browser
def test_data_docs_from_file_url_list_the_runs_with_no_network(browser, docs):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    net = Offline(context)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto((docs / "index.html").as_uri())
    # bootstrap-table (vendored) builds the rows: one per validated suite (dataset, batch).
    rows = page.locator("table.ge-index-page-validation-results-table tbody tr")
    rows.first.wait_for(timeout=15_000)
    page.wait_for_function("document.querySelector('.bootstrap-table') !== null", timeout=15_000)
    assert rows.count() == 2, page.content()[:3000]
    assert "product_intent.dataset" in rows.all_inner_texts()[0] + rows.all_inner_texts()[1]
    assert page.get_by_role("button", name="Clear Filters").first.is_visible()  # bootstrap-table's filters work
    assert net.outside == [] and errors == [], (net.outside, errors)
    _shot(page, "datadocs_index_file.png")

    rows.filter(has_text="product_intent.dataset").first.click()  # rows are clickable, as in GX
    page.wait_for_url(re.compile(r".*/validations/.*\.html$"), timeout=15_000)
    page.wait_for_load_state("load")
    _assert_styled(_is_bootstrap_styled(page))
    assert _settle(page) == ["loaded"]  # Font Awesome (vendored) draws the status icons
    assert net.outside == [] and errors == [], (net.outside, errors)
    _shot(page, "datadocs_validation_file.png")
    context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plugin_server():
    """The plugin's FastAPI app alone (uvicorn, in a thread) with Airflow's login check stubbed: the real headers,
    CSP and file rules, without an Airflow api-server (the stack test below covers the real one)."""
    import uvicorn

    spec = importlib.util.spec_from_file_location("retrain_ui_browser", REPO / "plugins" / "retrain_ui.py")
    ui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ui)

    async def logged_in(request):
        return True

    ui._authenticated = logged_in
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount(ui.URL_PREFIX, ui.app)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(outer, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}{ui.URL_PREFIX}"
    server.should_exit = True
    thread.join(timeout=10)


@needs_browser
def test_data_docs_served_by_the_plugin_list_the_runs_and_are_styled_without_scripts(browser, docs, plugin_server):
    rel = docs.relative_to(runs_dir()).as_posix()
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    net = Offline(context)
    page = context.new_page()
    blocked: list[str] = []
    page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
    response = page.goto(f"{plugin_server}/files/{rel}/index.html")
    assert response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'none'" in csp and "allow-scripts" not in csp  # unchanged: no script runs in a report
    rows = page.locator("table.ge-index-page-validation-results-table tbody tr")
    assert rows.count() == 2 and page.locator(".bootstrap-table").count() == 0  # plain HTML rows, no JS
    assert not page.get_by_role("button", name="Clear Filters").first.is_visible()  # needs JS: hidden
    texts = " ".join(rows.all_inner_texts())
    assert "manual__2026-12-01T09_00_00_00_00" in texts and "Success" in texts and "batch" in texts
    _assert_styled(_is_bootstrap_styled(page) | {"cell_padding": page.evaluate(
        "getComputedStyle(document.querySelector('table.table td')).paddingTop")})
    _shot(page, "datadocs_index_served.png")

    rows.filter(has_text="dataset").first.locator("a").first.click()
    page.wait_for_url(re.compile(r".*/validations/.*\.html$"), timeout=15_000)
    page.wait_for_load_state("load")
    _assert_styled(_is_bootstrap_styled(page))
    assert _settle(page) == ["loaded"]
    # Every stylesheet, font and image came from the plugin (same origin), none was refused.
    styles = [u for u in net.requests if u.endswith(".css")]
    assert any(u.endswith("/static/vendor/bootstrap.min.css") for u in styles), net.requests
    assert net.outside == [], net.outside
    assert not [b for b in blocked if "style" in b or "font" in b or "img" in b], blocked
    _shot(page, "datadocs_validation_served.png")

    # The failed attempt's docs: the index says Failed, the page names the expectation and the offending value.
    failed = (docs.parent.parent / "failed_attempt_docs").relative_to(runs_dir()).as_posix()
    page.goto(f"{plugin_server}/files/{failed}/index.html")
    assert "Failed" in page.locator("table.ge-index-page-validation-results-table tbody").inner_text()
    page.locator("table.ge-index-page-validation-results-table tbody tr", has_text="Failed").locator("a").click()
    _settle(page)
    assert "test_input_in_train_or_val" in page.content()
    page.get_by_text("test_input_in_train_or_val").first.evaluate("e => e.scrollIntoView({block: 'center'})")
    _shot(page, "datadocs_validation_failed_served.png")
    context.close()


# --- a person in the Airflow UI, against the production process list --------------------------------------------

STACK_ROWS, STACK_SEED, SAMPLE_LIMIT = 200, 23, 150
# Every field of the trigger form: which widget it is and which Param it edits.
_FORM_FIELDS_JS = """dialog => Array.from(dialog.querySelectorAll('[data-scope=field][data-part=root]')).map(f => {
    const named = f.querySelector('[name^=element_], [id*=element_]');
    const ref = named ? (named.getAttribute('name') || named.id) : '';
    const m = ref.match(/element_(\\w+)/);
    let widget = 'other';
    if (f.querySelector('[data-scope=switch] input[type=checkbox]')) widget = 'toggle';
    else if (f.querySelector('[data-scope=number-input] input[inputmode=decimal]')) widget = 'number';
    else if (f.querySelector('input[role=combobox]')) widget = 'select';
    else if (f.querySelector('textarea, .cm-editor')) widget = 'json';
    else if (Array.from(f.querySelectorAll('input')).some(i => i.type === 'text')) widget = 'text';
    return {param: m ? m[1] : null, label: (f.querySelector('label') || {}).innerText || '', widget};
}).filter(f => f.param)"""


def _expected_widget(schema: dict) -> str:
    types = schema.get("type") or []
    types = {types} if isinstance(types, str) else set(types)
    if "enum" in schema:
        return "select"
    if "boolean" in types:
        return "toggle"
    if types & {"integer", "number"}:
        return "number"
    if types & {"object", "array"}:
        return "json"
    return "text"


@pytest.fixture(scope="module")
def stack_rows(pg_url):
    from retrain import db
    from retrain.data.synthetic import seed_examples

    from conftest import TABLES

    # A clean slate: earlier tests of the session share this database, and rows they left behind (already past
    # the watermark) would make this month's batch empty.
    with db.connection(pg_url) as conn:
        db.ensure_schema(conn)
        with conn.cursor() as cur:
            cur.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
        seed_examples(conn, load_use_case("product_intent"), STACK_ROWS, seed=STACK_SEED, dirty=0.0)
        conn.commit()
    return STACK_ROWS


def _frame(page, url_part: str, timeout: float = 30.0):
    """The (embedded) frame whose URL contains url_part, once it has navigated there."""
    deadline = time.monotonic() + timeout
    while True:
        for frame in page.frames:
            if url_part in frame.url:
                return frame
        assert time.monotonic() < deadline, (url_part, [f.url for f in page.frames])
        page.wait_for_timeout(200)


def _open_section(dialog, name: str) -> None:
    """Expand one section of the trigger form (an accordion) and scroll it to the top of the dialog."""
    button = dialog.get_by_role("button", name=name, exact=True)
    if button.get_attribute("aria-expanded") != "true":
        button.click()
    dialog.page.wait_for_function("b => b.getAttribute('aria-expanded') === 'true'", arg=button.element_handle())
    button.evaluate("e => e.scrollIntoView({block: 'start'})")


def _log_in(page, stack, next_path: str) -> None:
    page.goto(f"{stack.api_url}{next_path}")
    page.fill("input[name=username]", stack.admin[0])
    page.fill("input[name=password]", stack.admin[1])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{next_path}", timeout=60_000)


@needs_browser
@pytest.mark.stack
def test_a_person_triggers_a_dry_run_and_follows_it_to_the_data_docs(stack, api, stack_rows, browser):
    params = api.get(f"/api/v2/dags/{DAG_ID}/details")["params"]
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(60_000)  # two cores shared with the whole stack
    net = Offline(context)
    page = context.new_page()

    # Log in (simple auth manager), open the DAG, open the trigger form with every section expanded.
    _log_in(page, stack, f"/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    sections = {p.get("schema", {}).get("section") for p in params.values()} - {None}
    assert sections, params
    for section in sorted(sections):
        _open_section(dialog, section)

    # Every Param is in the form, as the widget its type calls for (no JSON box where a number or a toggle belongs).
    fields = {f["param"]: f for f in dialog.evaluate(_FORM_FIELDS_JS)}
    assert set(fields) == set(params), (set(fields) ^ set(params))
    expected = {name: _expected_widget(p["schema"]) for name, p in params.items()}
    assert {n: f["widget"] for n, f in fields.items()} == expected
    assert expected["dry_run"] == "toggle" and expected["sample_limit"] == "number"
    assert expected["backend"] == "select" and expected["training_overrides"] == "json"
    for name, p in params.items():  # the form shows the Param's title, not its key
        assert fields[name]["label"].split("\n")[0].strip(" *") == p["schema"]["title"], (name, fields[name])

    _open_section(dialog, params["training_overrides"]["schema"]["section"])
    dialog.locator("input[name=element_max_train_steps]").wait_for(state="visible")
    _shot(page, "airflow_trigger_form_training.png")
    _open_section(dialog, params["dry_run"]["schema"]["section"])
    dialog.locator("[id='switch:element_dry_run']").click()
    dialog.locator("input[name=element_sample_limit]").fill(str(SAMPLE_LIMIT))
    assert dialog.locator("input[name=element_dry_run]").is_checked()
    _open_section(dialog, params["dry_run"]["schema"]["section"])
    _shot(page, "airflow_trigger_form.png")
    with page.expect_response(lambda r: r.url.endswith("/dagRuns") and r.request.method == "POST") as posted:
        dialog.get_by_role("button", name="Trigger", exact=True).click()
    assert posted.value.status == 200, posted.value.text()
    run = posted.value.json()
    run_id = run["dag_run_id"]
    # Typed values: a number and a boolean, not strings, reach the run's conf.
    assert run["conf"]["dry_run"] is True and run["conf"]["sample_limit"] == SAMPLE_LIMIT

    done = api.wait(run_id, timeout=300)
    assert done["state"] == "success", api.diagnose(run_id)
    states = {t: ti["state"] for t, ti in api.task_instances(run_id).items()}
    assert all(states[t] == "success" for t in ("prepare_run", "collect_examples", "build_dataset",
                                                 "validate_dataset")), states
    assert states["train_qlora"] == "skipped", states  # a dry run stops after validation

    # The grid: the run's column, every data stage green.
    page.goto(f"{stack.api_url}/dags/{DAG_ID}/runs/{run_id}")
    page.locator(f"a[href*='/runs/{run_id}/tasks/']").first.wait_for(timeout=30_000)
    page.wait_for_function("document.body.innerText.toLowerCase().includes('success')", timeout=30_000)
    _shot(page, "airflow_grid_dry_run.png")

    # The "LLM retraining" page from the navigation (Browse menu), embedded by Airflow.
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="LLM retraining").click()
    page.wait_for_url("**/plugin/llm-retraining")
    frame = page.frame_locator("iframe")
    row = frame.locator("tr", has_text=run_id)
    row.first.wait_for(timeout=30_000)
    assert "dry_run" in row.first.inner_text() and "passed" in row.first.inner_text()
    _shot(page, "retrain_page_dry_run.png")

    # Its Data Docs link: the index lists this run's validations (plain rows: scripts are blocked there) ...
    row.first.get_by_role("link", name="data docs").click()
    docs_rows = frame.locator("table.ge-index-page-validation-results-table tbody tr")
    docs_rows.first.wait_for(timeout=30_000)
    texts = docs_rows.all_inner_texts()
    assert len(texts) >= 2 and all("Success" in t for t in texts), texts
    assert any("product_intent.dataset" in t for t in texts) and any("product_intent.batch" in t for t in texts)
    _settle(_frame(page, "/data_docs/index.html"))
    _shot(page, "retrain_data_docs_index.png")

    # ... and the validation page is laid out by the vendored Bootstrap, inside the Airflow UI.
    docs_rows.filter(has_text="product_intent.dataset").first.locator("a").click()
    frame.get_by_text("Expectation Validation Result").first.wait_for(timeout=30_000)
    docs_frame = _frame(page, "/data_docs/validations/")
    assert _settle(docs_frame) == ["loaded"]  # the vendored icon font, served by the plugin
    _assert_styled(_is_bootstrap_styled(docs_frame))
    _shot(page, "retrain_data_docs_validation.png")
    assert net.outside == [], net.outside
    context.close()
