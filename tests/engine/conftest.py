"""Engine tests' shared fixtures: the packaged SmolLM2 GGUF (the default model)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def packaged_gguf() -> Path:
    """The packaged SmolLM2 GGUF file. `make install` installs it, so its absence fails the
    test (it is never a reason to skip)."""
    from fornax.runtime.errors import ModelLoadError
    from fornax.runtime.loaders.default_model import default_model_path

    try:
        return default_model_path()
    except ModelLoadError as exc:
        pytest.fail(f"{exc} (make install)")
