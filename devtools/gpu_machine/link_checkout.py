"""Make this checkout importable, with its SGLang plugin entry point, in the running Python's site-packages.

    "$VENV/bin/python" devtools/gpu_machine/link_checkout.py

What an editable install leaves, without a build backend (the GPU machine
has no index, and its setuptools may lack ``bdist_wheel``): a ``.pth`` file
naming the checkout, and a ``dist-info`` with the name, version and
``entry_points.txt`` of pyproject.toml, so that ``importlib.metadata`` (and
SGLang's ``load_plugins``) find ``sglang.srt.plugins``. Rerun it whenever the
checkout moves.
"""

from __future__ import annotations

import shutil
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    site = Path(sysconfig.get_paths()["purelib"])
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = project.get("entry-points", {})
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in items.items()) + "\n"
        for group, items in groups.items()
    )
    (dist / "entry_points.txt").write_text(entry_points)
    (dist / "INSTALLER").write_text("link_checkout\n")
    (dist / "RECORD").write_text("")
    (site / f"{name.replace('-', '_')}_checkout.pth").write_text(f"{ROOT}\n")


if __name__ == "__main__":
    main()
