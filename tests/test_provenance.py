"""edgekd.provenance: the block every benchmark writes into its results JSON and prints in its results .md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgekd import provenance

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A tiny git repository with one code file and one results file, committed."""
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "bench.py").write_text("print('hi')\n")
    (root / "benchmarks" / "results" / "x.json").write_text("{}\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "init")
    return root


def test_block_records_commit_and_what_makes_the_code_dirty(repo: Path):
    block = provenance.start(argv=[str(repo / "bench.py"), "--run", str(repo / "benchmarks")], root=repo).finish()
    assert block["commit"] == _git(repo, "rev-parse", "HEAD") and block["dirty"] is False
    assert block["command"] == "python bench.py --run benchmarks"  # paths inside the repository made relative
    # A rewritten results file or an untracked file is not a code change; an edited tracked file is.
    (repo / "benchmarks" / "results" / "x.json").write_text('{"new": 1}\n')
    (repo / "notes.txt").write_text("scratch\n")
    assert provenance.git_state(repo) == {"commit": block["commit"], "dirty": False}
    (repo / "bench.py").write_text("print('changed')\n")
    assert provenance.git_state(repo)["dirty"] is True


def test_outside_a_git_work_tree_commit_is_unknown(tmp_path: Path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}
    assert "unknown commit" in provenance.markdown(provenance.start(argv=["x.py"], root=tmp_path).finish())


def test_block_has_machine_versions_threads_load_and_dates():
    import torch

    block = provenance.start(threads=[1, 2], argv=["benchmarks/int8_speed.py"]).finish()
    json.dumps(block)  # JSON as it is
    assert block["cores"] == os.cpu_count() and block["cpu_model"]
    assert block["versions"]["torch"] == torch.__version__
    assert set(block["versions"]) == {"torch", "onnxruntime", "ai-edge-litert"}
    assert block["threads"]["setting"] == [1, 2] and block["threads"]["torch"] == torch.get_num_threads()
    for key in ("load_before", "load_after"):
        assert len(block[key]) == 3 and all(v >= 0 for v in block[key])
    assert block["date"] >= block["started"] and block["seconds"] >= 0
    md = provenance.markdown(block)
    assert md.startswith("## Provenance")
    for text in (f"`{block['command']}`", block["commit"][:12], block["cpu_model"], f"torch {torch.__version__}",
                 "setting [1, 2]", "before", "after"):
        assert text in md, text


def test_reading_the_threads_does_not_import_torch():
    code = ("import sys; from edgekd import provenance; provenance.start().finish(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_writes_a_provenance_block(script: Path):
    """Each script starts the block before measuring and puts it in what it writes (the JSON and the .md)."""
    text = script.read_text()
    assert re.search(r"provenance\.start\(", text), f"{script.name} does not start a provenance block"
    assert ".finish(" in text and "provenance.markdown(" in text, f"{script.name} does not write the block"


@pytest.mark.slow
def test_a_benchmark_run_writes_the_block_into_its_json_and_md(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prune_speed.py"), "--quick", "--no-onnx",
                           "--ratios", "0.5", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    block = json.loads((tmp_path / "prune_speed.json").read_text())["provenance"]
    assert block["command"].startswith("python benchmarks/prune_speed.py --quick")
    assert block["threads"]["setting"] == 1 and block["commit"]
    assert provenance.markdown(block) in (tmp_path / "prune_speed.md").read_text()


def test_kd_gain_table_states_the_measured_load_and_its_provenance(tmp_path: Path):
    """kd_gain.md says the load each seed run measured (it used to say "2 cores shared with other work" always)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kd_gain", REPO / "benchmarks" / "kd_gain.py")
    kd_gain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kd_gain)
    rows = [{"seed": s, "teacher": 0.99, "baseline": 0.96, "student": 0.975, "gap_closed": 0.5, "epoch_ratio": 1.1,
             "teacher_params": 100, "teacher_macs": 1000, "student_params": 10, "student_macs": 100,
             "load_avg_1m": load, "threads": 1} for s, load in ((0, 0.25), (1, 3.5))]
    cost = {"ratio": 1.05, "kd_epoch_s": 2.1, "plain_epoch_s": 2.0, "epochs_each": 4, "threads": 1, "cache_seconds": 3.0}
    block = provenance.start(argv=["benchmarks/kd_gain.py", "--seeds", "0", "1"]).finish()
    (tmp_path / "kd_gain.json").write_text(json.dumps({"recipe": "mnist", "seeds": [0, 1], "rows": rows,
                                                        "epoch_cost": cost, "provenance": block}))
    kd_gain.write_table(tmp_path)
    md = (tmp_path / "kd_gain.md").read_text()
    assert f"run: 0.2, 3.5 on {block['cores']} cores, this benchmark's own processes included" in md
    assert "shared with other work" not in md
    assert provenance.markdown(block) in md and "`python benchmarks/kd_gain.py --seeds 0 1`" in md


COMMITTED = sorted((REPO / "benchmarks" / "results").rglob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(REPO / "benchmarks" / "results")))
def test_every_committed_results_file_records_its_provenance(path: Path):
    """A results file without its command, commit, machine and load is not evidence: rerun it or remove it."""
    data = json.loads(path.read_text())
    block = data.get("provenance") if isinstance(data, dict) else None
    assert block, f"{path.name} has no provenance block"
    for key in ("command", "commit", "cpu_model", "versions", "threads", "load_before", "load_after", "date"):
        assert key in block, f"{path.name}: provenance lacks {key}"
    assert not re.search(r"(^|[\s'\"])/(work|tmp|home|root)/", json.dumps(data)), f"{path.name} holds a machine path"
    md = path.with_suffix(".md")
    if md.is_file():
        assert "## Provenance" in md.read_text() and block["command"] in md.read_text()
