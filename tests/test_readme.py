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
# The Fashion-MNIST recipe (the benchmark of record, 48 min on 2 cores) runs in CI on 2,000 images, one epoch a model.
RUN_BY_CI = {"edgekd run", "edgekd bundle --run exported/mnist", "edgekd run recipes/fashion_mnist.yaml"}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```console\n(.*?)```", README, flags=re.S)
    return [line[2:].split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_readme_setup_commands_are_what_make_and_ci_run():
    commands = readme_commands()
    assert "make demo" in commands and "make test" in commands
    assert "make test" in CI and "make demo" in CI
    assert "pip install -q torch==2.13.0" in MAKEFILE and '-e ".[test,executorch]"' in MAKEFILE
    assert "$(BIN)/edgekd run" in MAKEFILE
    for cmd in RUN_BY_CI:
        assert cmd in commands, cmd
    assert "edgekd bundle --run exported/mnist" in CI
    assert ".venv/bin/edgekd run recipes/fashion_mnist.yaml --name fashion-ci" in CI


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


DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BENCH_README = (ROOT / "benchmarks" / "README.md").read_text()


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_benchmarks_readme_has_a_section_per_script_and_only_options_the_script_takes():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")}
    assert set(re.findall(r"^## `(\w+\.py)`", BENCH_README, flags=re.M)) == scripts
    commands = re.findall(r"^\$ .*?python (benchmarks/\w+\.py)(.*)$", BENCH_README, flags=re.M)
    assert {Path(script).name for script, _ in commands} == scripts
    for script, args in commands:
        source = (ROOT / script).read_text()
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", args.split("  #")[0]):
            assert f'"{flag}"' in source, (script, flag)


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_to_files_and_headings_that_exist(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path) if path else doc
        assert dest.exists(), (target, "missing")
        if anchor:
            headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), flags=re.M)
            assert anchor in {_github_anchor(h) for h in headings}, (target, "no such heading")
