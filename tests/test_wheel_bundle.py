"""`edgekd bundle` from a wheel install: the device script ships inside the package.

The wheel is built from this checkout and installed (without dependencies) into a fresh virtual environment
whose only link to the dev environment is a .pth line naming the dev site-packages, so torch & co. import
but ``edgekd`` itself, and with it ``bench.py``, can only come from the wheel. The command runs outside the
source tree.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest_device import BENCH, REPO, device_run  # noqa: F401  (device_run is a fixture)

pytestmark = pytest.mark.slow


def test_bundle_from_an_installed_wheel(device_run, tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(dist.glob("edgekd-*.whl"))
    env = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "dev-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    where = subprocess.check_output([str(py), "-c", "import edgekd; print(edgekd.__file__)"], text=True, cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's edgekd, not the checkout's
    out = tmp_path / "bundle"
    # `python -m edgekd.bundle` is make_bundle, what `edgekd bundle` calls (the fixture run has no manifest).
    proc = subprocess.run([str(py), "-m", "edgekd.bundle", str(device_run.path), str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256((out / "bench.py").read_bytes()).digest() == hashlib.sha256(BENCH.read_bytes()).digest()
    assert (out / "metadata.json").is_file() and (out / "eval.npz").is_file()
