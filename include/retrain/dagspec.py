"""What the DAG files need at parse time, and nothing more.

The scheduler's DAG processor re-parses dags/ every few seconds, so this module reads the use-case YAML files
with the C YAML loader and no validation: full pydantic validation of the file (and of the trigger form) runs in
the first task of every run, where a mistake fails loudly and names the field.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DEFAULT_DIR = Path(__file__).resolve().parents[1] / "use_cases"


def use_case_specs() -> list[dict]:
    """Raw use-case mappings (name, description, thresholds, training) for every YAML file, sorted by name."""
    directory = Path(os.environ.get("RETRAIN_USE_CASES_DIR", _DEFAULT_DIR))
    specs = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.load(fh, Loader=_Loader)  # noqa: S506 - CSafeLoader is the safe loader
        except yaml.YAMLError as exc:
            # Still build the DAG: its first task reports the broken file instead of the whole dags/ file
            # turning into an import error that hides every other use case.
            data = {"_error": f"{path} is not valid YAML: {exc}"}
        if not isinstance(data, dict):
            data = {"_error": f"{path} must be a mapping of fields"}
        # The file name is the DAG's identity; a mismatching 'name' field is reported by the first task.
        data["_file_stem"] = path.stem
        specs.append(data)
    return specs
