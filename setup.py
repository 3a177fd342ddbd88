"""Package discovery: every folder with an __init__.py under the code directories becomes a
subpackage of `fornax` (pyproject.toml holds everything else)."""

from setuptools import find_packages, setup

CODE_DIRS = {"runtime": "runtime", "graphs": "graphs", "api": "api", "audio": "audio", "perf": "perf",
             "ray_serve": "ray_serve"}

packages = [
    f"fornax.{top}" + (f".{sub}" if sub else "")
    for top, folder in CODE_DIRS.items()
    for sub in [""] + find_packages(folder)
]
setup(
    packages=packages,
    package_dir={f"fornax.{top}": folder for top, folder in CODE_DIRS.items()},
    package_data={"fornax.runtime.kernels": ["csrc/*.c", "csrc/*.h"],
                  "fornax.api.server": ["vllm_serve_flags.json"]},
)
