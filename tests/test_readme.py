"""Every command in the README is run: here, or by CI (.ci/run)."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekd.cli import cli

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
# Run by CI on the default recipe (minutes): `make demo` is `edgekd run`, then `edgekd bundle` on its run.
RUN_BY_CI = {"edgekd run", "edgekd bundle --run exported/mnist"}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```console\n(.*?)```", README, flags=re.S)
    return [line[2:].split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_readme_setup_commands_are_what_make_and_ci_run():
    commands = readme_commands()
    assert "make demo" in commands and "make test" in commands
    assert "make test" in CI and "make demo" in CI
    assert "pip install -q torch==2.13.0" in MAKEFILE and '-e ".[test]"' in MAKEFILE
    assert "$(BIN)/edgekd run" in MAKEFILE
    for cmd in RUN_BY_CI:
        assert cmd in commands, cmd
    assert "edgekd bundle --run exported/mnist" in CI


@pytest.mark.slow
def test_readme_edgekd_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    ran = 0
    for cmd in readme_commands():
        if not cmd.startswith("edgekd ") or cmd in RUN_BY_CI:
            continue
        res = CliRunner().invoke(cli, shlex.split(cmd)[1:])
        assert res.exit_code == 0, (cmd, res.output[-2000:])
        ran += 1
    assert ran >= 8
    assert (tmp_path / "exported" / "digits-short" / "report.html").is_file()
