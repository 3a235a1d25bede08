"""Make a Great Expectations Data Docs site self-contained: no CDN, no external URL, readable without JavaScript.

GX 1.x writes pages that load jQuery, Popper, Bootstrap 4.3.1, bootstrap-table 1.19.1 (+ filter-control),
bootstrap-datepicker, bootstrap-dark, Font Awesome and vega from CDNs, a logo from S3, and links to
greatexpectations.io. On this platform the docs are opened offline (file://, a restored backup) or through the UI
plugin (``/retrain/files/...``), whose Content-Security-Policy forbids scripts and anything not same-origin. Opened
like that, the index was empty (its table is filled by bootstrap-table from an inline script) and the pages unstyled.

:func:`make_offline` runs after ``build_data_docs``:

* copies the vendored assets (``datadocs_static/vendor``: the exact versions GX asks for, from the npm registry,
  their licences in ``datadocs_static/licenses``) to ``<data_docs>/static/vendor/`` and points every page at them
  with relative paths (and without ``integrity``/``crossorigin``, which file:// pages cannot satisfy);
* drops vega (only GX's profiling charts use it; our expectations render none), the newsletter footer, and the
  href of any other external link, and points the S3 logo at the local copy GX already ships;
* writes the index's tables as plain HTML rows (run, suite, status, link to the validation page), so the index
  lists the validation runs with scripts blocked (and hides the filter buttons that need them). Where scripts run
  (file://), bootstrap-table still rebuilds the same rows with sorting and filters.

Standard library only: this module is imported by validate.py, which DAG files import at parse time.
"""

from __future__ import annotations

import ast
import html
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "datadocs_static"
VENDOR_DIR = STATIC_DIR / "vendor"
VENDOR_SUBDIR = "static/vendor"  # under the Data Docs root

# Every CDN asset GX 1.x's templates reference -> the vendored file (None: the tag is removed).
CDN_ASSETS: dict[str, str | None] = {
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.min.js",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
    # ~1 MB of chart libraries for GX's profiling/distribution charts, which no expectation of ours renders.
    "https://cdn.jsdelivr.net/npm/vega@5": None,
    "https://cdn.jsdelivr.net/npm/vega-lite@5": None,
    "https://cdn.jsdelivr.net/npm/vega-embed@6": None,
}
# Where scripting is off (the UI plugin serves reports sandboxed, without allow-scripts) the table toolbars' filter
# buttons do nothing: hide them. <noscript> renders exactly then, and the plugin's CSP allows inline styles.
_NOSCRIPT = '<noscript><style>[id$="-body-table-toolbar"] {display: none}</style></noscript>'
_LOGO = "static/images/logo-long.png"  # GX copies its own static/ (images, fonts, styles) into every site

_TAG = re.compile(r"<(script|link|img|a)\b([^>]*)>(\s*</script>)?", re.IGNORECASE)
_ATTR_URL = re.compile(r"""\b(src|href)\s*=\s*(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
_LINK_ATTR = re.compile(r"""\s*\bhref\s*=\s*(["']).*?\1""", re.IGNORECASE | re.DOTALL)
_SRI = re.compile(r"""\s+(integrity|crossorigin)(\s*=\s*(["']).*?\3)?""", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*(["']?)((?:https?:)?//[^)"']*)\1\s*\)""", re.IGNORECASE)
_FOOTER = re.compile(r"<footer>\s*<p>Stay current on everything GX.*?</footer>", re.IGNORECASE | re.DOTALL)
_STATIC_REF = re.compile(r"^(?:\./|(?:\.\./)*)static/")
EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # http://, https://, //host, ...


def make_offline(docs_dir: str | Path) -> list[Path]:
    """Rewrite the site in docs_dir as described in the module docstring; returns the HTML files rewritten."""
    docs_dir = Path(docs_dir)
    target = docs_dir / VENDOR_SUBDIR
    shutil.copytree(VENDOR_DIR, target, dirs_exist_ok=True)
    for css in (docs_dir / "static").rglob("*.css"):
        if target in css.parents:
            continue
        text = css.read_text(encoding="utf-8")
        fixed = _CSS_URL.sub(lambda m: _css_url(m, os.path.relpath(docs_dir / _LOGO, css.parent)), text)
        if fixed != text:
            css.write_text(fixed, encoding="utf-8")
    pages = sorted(docs_dir.rglob("*.html"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        fixed = rewrite_page(text, Path(os.path.relpath(docs_dir, page.parent)).as_posix())
        if page.parent == docs_dir and page.name == "index.html":
            fixed = static_index_tables(fixed)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")
    return pages


def rewrite_page(text: str, root: str) -> str:
    """One page's HTML with every external reference replaced; ``root`` is the site root relative to the page."""
    leftovers: list[str] = []

    def tag(m: re.Match) -> str:
        name, attrs, closing = m.group(1).lower(), m.group(2), m.group(3) or ""
        url_match = _ATTR_URL.search(attrs)
        url = url_match.group(3) if url_match else ""
        if not url_match:
            return m.group(0)
        if not EXTERNAL.match(url):
            # GX's validation pages point their favicon one directory short; make every static/ path exact.
            fixed = _STATIC_REF.sub(f"{root}/static/", url, count=1)
            if fixed == url:
                return m.group(0)
            attrs = _ATTR_URL.sub(lambda a: f'{a.group(1)}="{fixed}"', attrs, count=1)
            return f"<{m.group(1)}{attrs}>{closing}"
        if url in CDN_ASSETS:
            local = CDN_ASSETS[url]
            if local is None:
                return ""
            attrs = _SRI.sub("", attrs)
            attrs = _ATTR_URL.sub(lambda a: f'{a.group(1)}="{root}/{VENDOR_SUBDIR}/{local}"', attrs, count=1)
            return f"<{m.group(1)}{attrs}>{closing}"
        if name == "img":
            logo = f'src="{root}/{_LOGO}"'
            return f"<{m.group(1)}{_ATTR_URL.sub(lambda a: logo, attrs, count=1)}>{closing}"
        if name == "a":  # keep the link text, drop the way out
            return f"<{m.group(1)}{_LINK_ATTR.sub('', attrs, count=1)}>"
        leftovers.append(url)
        return ""  # an unknown external script or stylesheet: a newer GX template; never load it

    text = _FOOTER.sub("", text)
    if _NOSCRIPT not in text:
        text = text.replace("</head>", f"{_NOSCRIPT}\n</head>", 1)
    text = _TAG.sub(tag, text)
    text = _CSS_URL.sub(lambda m: _css_url(m, f"{root}/{_LOGO}"), text)
    if leftovers:
        log.warning("Data Docs: removed unknown external assets %s (vendor them in %s)", leftovers, STATIC_DIR)
    return text


def _css_url(m: re.Match, logo: str) -> str:
    # GX's only external CSS image is its logo (dark variant); use the local one.
    return f"url('{logo}')" if m.group(2).lower().split("?")[0].endswith((".png", ".svg")) else "none"


# --- the index's tables as HTML ---------------------------------------------------------------------------------

_TABLE_CALL = re.compile(
    r"\$\('#(?P<id>[\w-]+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*columns:\s*(?P<columns>\[.*?\]),\s*"
    r"data:\s*(?P<data>\[.*?\]),\s*\n\s*toolbar:",
    re.DOTALL,
)
_HTML_TAG = re.compile(r"<[^>]+>")


def static_index_tables(text: str) -> str:
    """Fill each empty bootstrap-table of the index with the rows its inline script would have built."""
    for call in _TABLE_CALL.finditer(text):
        try:
            columns = ast.literal_eval(call.group("columns"))
            rows = ast.literal_eval(call.group("data"))
        except (ValueError, SyntaxError):
            log.warning("Data Docs: index table %s not understood; it needs JavaScript", call.group("id"))
            continue
        empty = re.compile(rf'(<table\s+id="{re.escape(call.group("id"))}"\s+class=")([^"]*)("[^>]*>)\s*</table>')
        body = _table_html(columns, rows)
        text = empty.sub(lambda m: f"{m.group(1)}table {m.group(2)}{m.group(3)}{body}</table>", text, count=1)
    return text


def _table_html(columns: list[dict], rows: list[dict]) -> str:
    fields = [c["field"] for c in columns]
    link_field = "run_name" if "run_name" in fields else fields[0]
    head = "".join(f"<th>{html.escape(str(c.get('title', c['field'])))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for field in fields:
            text = html.escape(_cell_text(row, field))
            if field == "validation_success":
                css = "text-success" if text == "Success" else "text-danger"
                text = f'<span class="{css}">{text}</span>'
            link = row.get("_table_row_link_path")
            if field == link_field and isinstance(link, str) and not EXTERNAL.match(link):
                text = f'<a href="{html.escape(link)}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"\n<thead><tr>{head}</tr></thead>\n<tbody>\n{chr(10).join(body)}\n</tbody>\n"


def _cell_text(row: dict, field: str) -> str:
    for key in (f"_{field}_text", f"_{field}_sort"):
        if isinstance(row.get(key), str):
            return row[key]
    return " ".join(_HTML_TAG.sub(" ", html.unescape(str(row.get(field, "")))).split())
