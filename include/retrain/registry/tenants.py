"""Per-tenant models of a generation use case (issue 20): one LoRA adapter per user, keyed in the registry.

The registry, deploy, rollback and backup code takes a ``use_case`` string and keeps one production version per
value. A tenant's model is registered under :func:`model_key` (``"email_voice@alice"``), so each tenant has its own
version numbers, its own production alias (``$RETRAIN_HOME/models/email_voice@alice/production``) and its own
history, with no change to the tables.

What a tenant's version directory holds (written by :func:`write_export` next to the trained adapter, copied
as-is by ``retrain.registry.deploy``)::

    versions/v<N>/adapter/      the PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
    versions/v<N>/Modelfile     FROM <base model> + ADAPTER ./adapter: `ollama create <name> -f Modelfile`
    versions/v<N>/merged/       the base with the adapter merged in, only when the use case asks for it
    versions/v<N>/EXPORT.json   tenant, base model, registry key, run id
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from retrain.registry.store import RegistryError


SEPARATOR = "@"
EXPORT_FILE = "EXPORT.json"
MODELFILE = "Modelfile"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


class TenantError(RegistryError):
    """A tenant name or a tenant's model cannot be used; the message says what to fix."""


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not tenant.strip():
        raise TenantError(f"tenant {tenant!r} is not a tenant id: give the user id the examples carry")
    return tenant


def model_key(use_case: str, tenant: str) -> str:
    """The registry key of one tenant's model: ``f"{use_case}@{tenant}"``.

    The key names the tenant's model directory, so a tenant id that is not a safe path component ('a/b', '..',
    'josé') is spelled as its run-directory name (``retrain.rundir.tenant_dir_name``: kept when safe, else made safe
    with a hash of the original)."""
    from retrain.rundir import tenant_dir_name

    if not use_case or SEPARATOR in use_case:
        raise TenantError(f"use case {use_case!r} cannot carry a tenant: its name is empty or contains "
                          f"{SEPARATOR!r}")
    return f"{use_case}{SEPARATOR}{tenant_dir_name(check_tenant(tenant))}"


def split_key(key: str) -> tuple[str, str | None]:
    """(use case, tenant) of a registry key; tenant None for a use case's own (structured) model."""
    use_case, sep, tenant = key.partition(SEPARATOR)
    return use_case, (tenant if sep else None)


def is_tenant_key(key: str) -> bool:
    return split_key(key)[1] is not None


def adapter_of(model_dir: str | Path) -> Path | None:
    """The PEFT adapter directory of an exported/deployed tenant model (or of a bare adapter directory)."""
    path = Path(model_dir)
    for candidate in (path / ADAPTER_DIR, path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


# --- the export written next to a tenant's trained adapter ------------------------------------------------------


def modelfile_text(*, base: str, system_prompt: str, chat_template: str | None, key: str,
                   max_tokens: int | None = None, merged: bool = False) -> str:
    """Ollama Modelfile of one tenant: the shared base + this tenant's LoRA adapter (seed 003's option A)."""
    from retrain.train.qlora.artifacts import ollama_template

    template, stops = ollama_template(chat_template)
    system = system_prompt.replace('"""', '\\"\\"\\"')
    lines = [
        f"# Ollama Modelfile of {key}: the base model plus this tenant's LoRA adapter. From this directory:",
        f"#   ollama create {key.replace(SEPARATOR, '-')} -f {MODELFILE}",
        "# FROM must be the same base the adapter was trained on (an Ollama model name or a safetensors directory).",
    ]
    if merged:
        lines.append(f"# A merged copy is in ./{MERGED_DIR}: replace the two lines below by FROM ./{MERGED_DIR}.")
    lines += [f"FROM {base}", f"ADAPTER ./{ADAPTER_DIR}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    lines.append(f'SYSTEM """{system}"""')
    lines.append("PARAMETER temperature 0")
    if max_tokens:
        lines.append(f"PARAMETER num_predict {int(max_tokens)}")
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    return "\n".join(lines) + "\n"


def write_export(export_dir: str | Path, *, adapter_dir: str | Path, base_model: str, base_path: str, key: str,
                 run_id: str, system_prompt: str, max_tokens: int | None = None,
                 merged_dir: str | Path | None = None) -> Path:
    """Build ``export_dir`` (adapter/, Modelfile, EXPORT.json, merged/ if given) atomically; idempotent."""
    from transformers import AutoTokenizer

    from retrain.train.qlora.artifacts import replace_dir

    export_dir = Path(export_dir)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TenantError(f"{adapter_dir} holds no PEFT adapter (adapter_config.json): the tenant's training did "
                          "not finish; retry its train_tenant task")
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(adapter_dir, tmp / ADAPTER_DIR)
    if merged_dir is not None:
        shutil.copytree(merged_dir, tmp / MERGED_DIR)
    template = getattr(AutoTokenizer.from_pretrained(base_path), "chat_template", None)
    (tmp / MODELFILE).write_text(modelfile_text(base=base_path, system_prompt=system_prompt, chat_template=template,
                                                key=key, max_tokens=max_tokens, merged=merged_dir is not None))
    use_case, tenant = split_key(key)
    (tmp / EXPORT_FILE).write_text(json.dumps({"key": key, "use_case": use_case, "tenant": tenant,
                                               "base_model": base_model, "base_path": base_path, "run_id": run_id,
                                               "merged": merged_dir is not None}, indent=2))
    replace_dir(tmp, export_dir)
    return export_dir


# --- rollback of one tenant ------------------------------------------------------------------------------------


def run_rollback(use_case: str, tenant: str, *, to_version: int | None = None, reason: str, actor: str,
                 run_id: str | None = None) -> dict:
    """`retrain rollback --use-case U --tenant T`: the tenant's production alias goes back one version (or to
    ``to_version``); the other tenants are untouched."""
    from retrain.registry.deploy import run_rollback as rollback_model
    from retrain.schemas.use_case import load_use_case

    uc = load_use_case(use_case)  # an unknown name fails here, listing the known use cases
    if getattr(uc, "kind", "structured") != "generation":
        raise TenantError(f"use case {use_case} has no tenants (kind: {getattr(uc, 'kind', 'structured')}): "
                          "roll it back without --tenant")
    key = model_key(use_case, tenant)
    result = rollback_model(use_case, to_version=to_version, reason=reason, actor=actor, run_id=run_id, model=key)
    return result | {"tenant": tenant, "key": key}
