"""pyproject.toml names every package of the source tree.  The editable
install the README uses finds modules by directory, so a package missing from
``[tool.setuptools] packages`` only shows on an ordinary (wheel) install,
where ``blockvault`` then fails to import its own command line."""

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("engine", "chunkstore", "native"):
        for dirpath, dirnames, filenames in os.walk(ROOT / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                found.add(".".join(Path(dirpath).relative_to(ROOT).parts))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
