"""The first steps of a new user: the README's set-up and what scripts/bootstrap says."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_says_how_to_set_up_once_before_the_use_section():
    readme = (ROOT / "README.md").read_text()
    use = readme.index("\n## Quickstart")
    for step in ("    scripts/bootstrap\n", "    source .venv/bin/activate\n"):
        assert -1 < readme.find(step) < use, step
    assert readme.index("scripts/bootstrap") < readme.index("source .venv/bin/activate")


def test_bootstrap_says_what_it_is_doing_and_when_it_is_done(tmp_path):
    # A copy of the script in a clone whose .venv python only records how pip was called.
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap", tmp_path / "scripts" / "bootstrap")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "pip-calls"}\n')
    python.chmod(0o755)
    data = tmp_path / "fashion"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    env = os.environ | {"STARMAMBA_FASHION_MNIST": str(data)}
    done = subprocess.run(
        [str(tmp_path / "scripts" / "bootstrap")], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [
        "Installing starmamba and its test tools into .venv (a minute or so; quiet unless something fails) ...",
        f"Fashion-MNIST found in {data}.",
        "Set up. Activate it with 'source .venv/bin/activate', then run 'starmamba --help'.",
    ]
    assert (tmp_path / "pip-calls").read_text().startswith("-m pip install ")
