"""What the DAG files need at parse time, and nothing more.

The scheduler's DAG processor re-parses dags/ every few seconds, so this module reads the use-case YAML files
with the C YAML loader and no validation: full pydantic validation of the file (and of the trigger form) runs in
the first task of every run, where a mistake fails loudly and names the file and the field. Whatever one file
holds (invalid YAML, a list, ``training: qlora``, ``max_cost_usd: ten``), it yields a mapping here and a DAG in
the DAG file, so one broken file never hides the other use cases.
"""

from __future__ import annotations

import re

import yaml

from retrain.settings import use_cases_dir

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


def use_case_specs() -> list[dict]:
    """Raw use-case mappings for every YAML file, sorted by name, each with ``_file_stem`` (the use case's name,
    as prepare_run loads it) and ``_dag_id`` (``retrain_<stem>``, made safe for Airflow)."""
    specs = []
    for path in sorted(use_cases_dir().glob("*.yaml")):
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.load(fh, Loader=_Loader)  # noqa: S506 - CSafeLoader is the safe loader
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            # Still build the DAG: its first task reports the broken file instead of the whole dags/ file
            # turning into an import error that hides every other use case.
            data = {"_error": f"{path} is not valid YAML: {exc}"}
        if not isinstance(data, dict):
            data = {"_error": f"{path} must be a mapping of fields"}
        # The file name is the DAG's identity; a mismatching 'name' field is reported by the first task.
        data["_file_stem"] = path.stem
        data["_dag_id"] = "retrain_" + _UNSAFE_ID.sub("_", path.stem)
        specs.append(data)
    return specs


def text(spec: dict, key: str, default: str = "") -> str:
    """A free-text field of the raw mapping as one line (whatever type the file gave it)."""
    value = spec.get(key)
    return " ".join(str(value).split()) if value is not None else default
