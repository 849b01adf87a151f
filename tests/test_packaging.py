"""The source distribution builds on its own: setup.py's CMake extension names no sources, so
only MANIFEST.in puts CMakeLists.txt and csrc/ in the sdist (without them `pip install
fedmpq-*.tar.gz` and `python -m build` fail in CMake)."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="not a source checkout")
def test_the_sdist_holds_every_file_the_native_build_and_the_flower_app_read(tmp_path):
    # egg_info into tmp_path: the checkout is left as it was
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                    "--formats=gztar", "--dist-dir", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    (sdist,) = tmp_path.glob("fedmpq-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "flower/pyproject.toml"}
    wanted |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "fedmpq_kernels").rglob("*.py")}
    assert sorted(wanted - names) == []
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]  # no build outputs
