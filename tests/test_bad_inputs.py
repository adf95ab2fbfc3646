"""Bad input to every command, one table row each: the exit code, one error line, and no model file written.

Exit codes: 2 for bad input or usage (recipe, option, data, checkpoint, run directory, device JSON), 1 for a
check that ran and failed (here: a file changed since edgekd wrote it). Every row runs the real command through
click's CliRunner on a copy of the session's tiny run (``tiny_run``) or of its exported copy, and checks that the
output holds no traceback, that the error line names what is wrong, and that no ``*.pt``, ``*.onnx``,
``*.tflite`` or ``*.safetensors`` file appeared in (or changed under) the directory the command writes to.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from edgekd.cli import cli

from conftest import TINY_RECIPE, write_recipe
from test_validate import exported_tiny_run

MODEL_SUFFIXES = (".pt", ".onnx", ".tflite", ".pte", ".safetensors")


@dataclass
class Env:
    """What a row's setup may use: a private folder and fresh copies of the shared runs."""

    tmp: Path
    tiny_run: Path
    exported_run: Path

    @property
    def out(self) -> Path:
        """The --out folder distill/run/sweep rows write to (not created beforehand)."""
        return self.tmp / "out"

    def recipe(self, **changes) -> str:
        """The tiny recipe with sections updated (``data=`` too, which write_recipe's signature takes)."""
        recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
        for key, value in changes.items():
            recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
        return str(write_recipe(self.tmp / "r.yaml", recipe))

    def file(self, name: str, content: str | bytes) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return str(p)

    def run(self) -> Path:
        """A private copy of the finished tiny distill run."""
        return Path(shutil.copytree(self.tiny_run, self.tmp / "run"))

    def exported(self) -> Path:
        """A private copy of the tiny run exported to ONNX and TFLite (fp32, int8, dynamic)."""
        return Path(shutil.copytree(self.exported_run, self.tmp / "run"))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _pickled_teacher(env: Env) -> str:
    from edgekd.models import create_model

    p = env.tmp / "whole.pt"
    torch.save(create_model("cnn", (1, 8, 8), 10, width=8, depth=2), p)  # a whole module: needs unpickling
    return str(p)


# A row's setup returns (argv, the directory the command writes to); the row then gives the exit code and a
# piece of text the error line must contain.
Setup = Callable[[Env], "tuple[list[str], Path]"]


def distill(*extra: str, recipe: Callable[[Env], str] | None = None) -> Setup:
    def setup(env: Env) -> tuple[list[str], Path]:
        r = recipe(env) if recipe else env.recipe()
        return ["distill", r, "--out", str(env.out), "-q", *[a.format(tmp=env.tmp) for a in extra]], env.out
    return setup


def on_run(cmd: list[str], prepare: Callable[[Path, Env], None] | None = None, exported: bool = False) -> Setup:
    """A stage command on a private copy of the tiny run (``prepare`` damages it first)."""
    def setup(env: Env) -> tuple[list[str], Path]:
        run = env.exported() if exported else env.run()
        if prepare:
            prepare(run, env)
        return [cmd[0], "--run", str(run), *[a.format(run=run, tmp=env.tmp) for a in cmd[1:]]], run
    return setup


def plain(*argv: str) -> Setup:
    def setup(env: Env) -> tuple[list[str], Path]:
        env.tmp.mkdir(exist_ok=True)
        return [a.format(tmp=env.tmp) for a in argv], env.tmp
    return setup


def _npz_without_y(env: Env) -> str:
    np.savez(env.tmp / "noy.npz", x=np.zeros((40, 1, 8, 8), np.float32), labels=np.arange(40) % 2)
    return env.recipe(data={"dataset": "npz", "path": str(env.tmp / "noy.npz")})


def _csv_unknown_label(env: Env) -> str:
    rows = "\n".join(f"{i % 3},{i / 10},{i % 2}" for i in range(40))
    path = env.file("table.csv", "a,b,target\n" + rows + "\n")
    return env.recipe(data={"dataset": "csv", "path": path, "label_column": "label"},
                      teacher={"model": "mlp", "kwargs": {}}, student={"model": "mlp", "kwargs": {}})


def _empty_folder(env: Env) -> str:
    for c in ("cat", "dog"):
        (env.tmp / "images" / c).mkdir(parents=True)
    return env.recipe(data={"dataset": "folder", "path": str(env.tmp / "images")})


def _no_class_folders(env: Env) -> str:
    (env.tmp / "flat").mkdir()
    return env.recipe(data={"dataset": "folder", "path": str(env.tmp / "flat")})


def _device_json(content: str) -> Callable[[Path, Env], None]:
    def prepare(run: Path, env: Env) -> None:
        env.file("device.json", content)
    return prepare


def _rm(*names: str) -> Callable[[Path, Env], None]:
    def prepare(run: Path, env: Env) -> None:
        for n in names:
            (run / n).unlink()
    return prepare


def _write(name: str, content: str, unrecord: bool = False) -> Callable[[Path, Env], None]:
    """Overwrite a run file by hand (``unrecord``: also drop it from the manifest, so no tamper check fires)."""
    def prepare(run: Path, env: Env) -> None:
        if unrecord:
            manifest = json.loads((run / "manifest.json").read_text())
            manifest["artifacts"].pop(name, None)
            (run / "manifest.json").write_text(json.dumps(manifest))
        (run / name).write_text(content)
    return prepare


def _damage(name: str, how: str = "truncate") -> Callable[[Path, Env], None]:
    def prepare(run: Path, env: Env) -> None:
        _truncate(run / name) if how == "truncate" else _flip_byte(run / name, 200)
    return prepare


def _empty_dir(env: Env) -> tuple[list[str], Path]:
    (env.tmp / "empty").mkdir(parents=True)
    return ["export", "--run", str(env.tmp / "empty")], env.tmp / "empty"


def _no_runs(cmd: str) -> Setup:
    def setup(env: Env) -> tuple[list[str], Path]:
        (env.tmp / "runs").mkdir(parents=True)
        return [cmd, "--out", str(env.tmp / "runs")], env.tmp / "runs"
    return setup


ROWS: list[tuple[str, Setup, int, str]] = [
    # -- recipes (distill, run, sweep) --
    ("distill: missing recipe file", distill(recipe=lambda e: str(e.tmp / "nope.yaml")), 2, "not found"),
    ("distill: empty recipe", distill(recipe=lambda e: e.file("empty.yaml", "")), 2, "is empty"),
    ("distill: invalid YAML", distill(recipe=lambda e: e.file("b.yaml", "data: {dataset: digits\n")), 2,
     "not valid YAML"),
    ("distill: recipe is a list", distill(recipe=lambda e: e.file("l.yaml", "- a\n- b\n")), 2, "must be a mapping"),
    ("distill: recipe is binary", distill(recipe=lambda e: e.file("bin.yaml", b"\xff\xfe\x00\x81garbage")), 2,
     "is not a text file"),
    ("distill: unknown key", distill(recipe=lambda e: e.recipe(distill={"temprature": 3})), 2,
     "did you mean 'distill.loss.temperature'"),
    ("distill: wrong type", distill(recipe=lambda e: e.recipe(distill={"epochs": "many"})), 2, "distill.epochs"),
    ("distill: bad --set", distill("--set", "epochs"), 2, "section.key=value"),
    ("distill: --set into a value", distill("--set", "name.x=1"), 2, "name is not a section"),
    ("distill: --set wrong type", distill("--set", "data.batch_size=big"), 2, "data.batch_size"),
    ("distill: --seed not a number", distill("--seed", "abc"), 2, "--seed"),
    ("distill: --resume with nothing to resume", distill("--resume"), 2, "nothing to resume"),
    # -- data files --
    ("distill: npz without y", distill(recipe=_npz_without_y), 2, "arrays named 'x' and 'y'"),
    ("distill: csv unknown label column", distill(recipe=_csv_unknown_label), 2, "no column 'label'"),
    ("distill: image folder with empty classes", distill(recipe=_empty_folder), 2, "holds no images"),
    ("distill: image folder without classes", distill(recipe=_no_class_folders), 2, "one sub-folder per class"),
    ("distill: data path missing", distill("--set", "data.dataset=npz", "--set", "data.path={tmp}/none.npz"), 2,
     "does not exist"),
    # -- checkpoints --
    ("distill: missing teacher checkpoint", distill("--set", "teacher.checkpoint={tmp}/none.pt"), 2, "not found"),
    ("distill: corrupt teacher checkpoint",
     distill(recipe=lambda e: e.recipe(teacher={"checkpoint": e.file("bad.pt", b"PK\x03\x04garbage")})), 2,
     "corrupt"),
    ("distill: corrupt safetensors",
     distill(recipe=lambda e: e.recipe(teacher={"checkpoint": e.file("bad.safetensors", b"\x08\x00\x00")})), 2,
     "safetensors"),
    ("distill: checkpoint needs pickle",
     distill(recipe=lambda e: e.recipe(teacher={"checkpoint": _pickled_teacher(e)})), 2, "--allow-pickle"),
    ("run: missing recipe", plain("run", "{tmp}/nope.yaml", "--out", "{tmp}/out", "-q"), 2, "not found"),
    ("run: a directory as recipe", plain("run", "{tmp}", "--out", "{tmp}/out", "-q"), 2, "is a directory"),
    ("run: unknown key via --set", plain("run", "digits", "--out", "{tmp}/out", "-q", "--set", "bench.rnus=3"), 2,
     "did you mean 'bench.runs'"),
    ("run: unknown export format, before any training",
     plain("run", "digits", "--out", "{tmp}/out", "-q", "--set", "export.formats=[onnx,tfilte]"), 2,
     "unknown format 'tfilte' (did you mean 'tflite'?)"),
    ("sweep: invalid YAML", lambda e: (["sweep", e.file("b.yaml", "a: [1\n"), "--out", str(e.tmp / "sw")], e.tmp), 2,
     "not valid YAML"),
    ("sweep: --trials 0", plain("sweep", "digits", "--trials", "0", "--out", "{tmp}/sw"), 2, "--trials"),
    # -- run directories and options of the stage commands --
    ("prune: nonexistent --run", plain("prune", "--run", "{tmp}/nowhere"), 2, "does not exist"),
    ("prune: no run in --out", _no_runs("prune"), 2, "no run found"),
    ("export: empty run dir (no manifest)", _empty_dir, 2, "no manifest.json"),
    ("export: missing student.pt", on_run(["export", "-q"], _rm("student.pt")), 2, "no student.pt"),
    ("export: truncated student.pt", on_run(["export", "-q"], _damage("student.pt")), 1,
     "student.pt changed since it was written"),
    ("export: unknown precision", on_run(["export", "--quantize", "int4"]), 2, "unknown precision 'int4'"),
    ("export: unknown format name", on_run(["export", "--format", "ptee"]), 2,
     "unknown format 'ptee' (did you mean 'pte'?)"),
    ("export: unknown key in a backend's section", on_run(["export", "--set", "export.pte.threads=2"]), 2,
     "unknown key 'export.pte.threads'"),
    ("export: mcu without int8", on_run(["export", "--mcu", "--quantize", "fp16"]), 2,
     "the MCU target needs the static int8 TFLite file"),
    ("run: a format whose source is missing, before any training",
     plain("run", "digits", "--out", "{tmp}/out", "-q", "--set", "export.formats=[mcu]",
           "--set", "export.quantize=[fp16]"), 2, "the MCU target needs the static int8 TFLite file"),
    ("run: a section of an unknown backend, before any training",
     plain("run", "digits", "--out", "{tmp}/out", "-q", "--set", "export.tflte.nhwc=true"), 2,
     "unknown format 'tflte' (did you mean 'tflite'?)"),
    ("quantize: nothing exported yet", on_run(["quantize", "--precision", "int8"]), 2, "run `edgekd export` first"),
    ("quantize: truncated fp32 onnx", on_run(["quantize", "--precision", "dynamic", "--file", "student_fp32.onnx"],
                                             _damage("student_fp32.onnx"), exported=True), 1,
     "student_fp32.onnx changed since it was exported"),
    ("quantize: unknown --file", on_run(["quantize", "--file", "nope.onnx"], exported=True), 2,
     "nope.onnx is not an exported fp32 file"),
    ("validate: nonexistent --run", plain("validate", "--run", "{tmp}/nowhere"), 2, "does not exist"),
    ("validate: missing metadata.json", on_run(["validate", "-q"], _rm("metadata.json"), exported=True), 2,
     "metadata.json is missing"),
    ("validate: truncated .tflite", on_run(["validate", "-q"], _damage("student_int8.tflite"), exported=True), 1,
     "student_int8.tflite changed since it was written"),
    ("validate: truncated .onnx", on_run(["validate", "-q"], _damage("teacher_fp32.onnx"), exported=True), 1,
     "teacher_fp32.onnx changed since it was written"),
    ("validate: bad budget --set", on_run(["validate", "--set", "validate.max_size_kb=-1"]), 2,
     "validate.max_size_kb"),
    ("validate: unknown runtime", on_run(["validate", "--runtime", "tensorrt"]), 2, "unknown runtime 'tensorrt'"),
    ("bench: --threads 0", on_run(["bench", "--threads", "0"]), 2, "--threads must be positive"),
    ("bench: --threads abc", on_run(["bench", "--threads", "1,abc"]), 2, "'abc' is not a number"),
    ("bench: --runs and --seconds", on_run(["bench", "--runs", "5", "--seconds", "1"]), 2, "not both"),
    ("bench: truncated .tflite", on_run(["bench", "--runtime", "litert", "--runs", "5"],
                                        _damage("student_fp32.tflite", "flip"), exported=True), 1,
     "student_fp32.tflite changed since it was written (sha256 mismatch)"),
    ("bench: --set of another section", on_run(["bench", "--set", "distill.lr=1"]), 2,
     "`edgekd bench` reads only the recipe's 'bench' section"),
    ("prune: --set unknown key", on_run(["prune", "--set", "prune.ratoi=0.3"]), 2, "did you mean 'prune.ratio'?"),
    ("prune: --set of another section", on_run(["prune", "--set", "distill.lr=1"]), 2,
     "`edgekd prune` reads only the recipe's 'prune' section"),
    ("export: --set bad value", on_run(["export", "--set", "export.calibration_samples=0"]), 2,
     "export.calibration_samples"),
    ("report: --set bad budget", on_run(["report", "--set", "validate.max_p50_ms=-1"]), 2, "validate.max_p50_ms"),
    ("report: device JSON missing", on_run(["report", "--device", "{tmp}/none.json"]), 2, "not found"),
    ("report: device JSON invalid", on_run(["report", "--device", "{tmp}/device.json"], _device_json("{oops")), 2,
     "not valid JSON"),
    ("report: device JSON wrong schema", on_run(["report", "--device", "{tmp}/device.json"],
                                                _device_json('{"device": {}, "rows": []}')), 2, "no 'results' list"),
    ("report: device result without p50", on_run(["report", "--device", "{tmp}/device.json"], _device_json(
        '{"device": {"name": "pi"}, "results": [{"file": "student_fp32.tflite", "p50_ms": "fast"}]}')), 2,
     "p50_ms"),
    ("report: run without metrics.json", on_run(["report"], _rm("metrics.json")), 2, "no metrics.json"),
    ("bundle: run not exported", on_run(["bundle"]), 2, "not an exported run directory"),
    ("bundle: truncated .tflite", on_run(["bundle"], _damage("student_fp32.tflite"), exported=True), 1,
     "differs from the sha256"),
    # -- damaged bookkeeping files and output locations --
    ("validate: manifest.json is a list", on_run(["validate"], _write("manifest.json", "[]")), 2,
     "manifest.json holds a list, not an object"),
    ("bench: manifest artifacts damaged", on_run(["bench"], _write("manifest.json", '{"artifacts": [1]}')), 2,
     "'artifacts' is not an object"),
    ("validate: data.json is a list", on_run(["validate"], _write("data.json", "[]", unrecord=True)), 2,
     "data.json holds a list"),
    ("report: metrics.json is a list", on_run(["report"], _write("metrics.json", "[]")), 2,
     "metrics.json holds a list"),
    ("report: report.json rows damaged", on_run(["report"], _write("report.json", '{"rows": 5}')), 2,
     "'rows' is not a list"),
    ("validate: metadata.json points outside the run", on_run(["validate", "--runtime", "torch"], _write(
        "metadata.json", '{"models": [{"file": "../../x.onnx", "format": "onnx"}]}', unrecord=True)), 2,
     "not a file name inside the run"),
    ("distill: --out below a file", distill("--out", "{tmp}/r.yaml/out"), 2, "Not a directory"),
    ("bundle: --dest below a file", on_run(["bundle", "--dest", "{run}/recipe.yaml/bundle"], exported=True), 2,
     "cannot write"),
    ("distill: loss temperature is text", distill("--set", "distill.loss.temperature=hot"), 2,
     "temperature must be a number, got 'hot'"),
    ("losses: extra argument", plain("losses", "kd"), 2, "unexpected extra argument"),
    ("models: unknown option", plain("models", "--all"), 2, "no such option"),
]


def _model_files(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES}


@pytest.fixture(scope="module")
def exported_run(tiny_run: Path, tmp_path_factory) -> Path:
    return exported_tiny_run(tiny_run, tmp_path_factory)


def test_table_is_large_and_covers_every_command():
    assert len(ROWS) >= 30
    assert len({label for label, *_ in ROWS}) == len(ROWS)
    commands = {label.split(":")[0] for label, *_ in ROWS}
    assert commands >= {"distill", "prune", "export", "quantize", "validate", "bench", "report", "run", "bundle",
                        "sweep", "losses", "models"}


@pytest.mark.parametrize("label,setup,code,expected", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(label: str, setup: Setup, code: int, expected: str, tmp_path: Path, tiny_run: Path,
                   exported_run: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands that default to ./exported never see the repository's runs
    env = Env(tmp_path / "case", tiny_run, exported_run)
    env.tmp.mkdir()
    argv, watched = setup(env)
    before = _model_files(watched)
    res = CliRunner().invoke(cli, argv)
    out = res.output
    assert res.exit_code == code, (argv, res.exit_code, out[-2000:])
    assert "Traceback" not in out and not isinstance(res.exception, (AssertionError, TypeError)), out[-2000:]
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    error = lines[-1]
    # edgekd's own errors are one line; click's usage errors end with one "Error: ..." line.
    assert error.startswith(("error: ", "Error: ")), out[-2000:]
    assert sum(ln.startswith(("error: ", "Error: ")) for ln in lines) == 1, out[-2000:]
    assert expected.lower() in error.lower(), (expected, error)
    assert _model_files(watched) == before, "a model file was written or changed"


# -- tamper detection in `edgekd validate` ------------------------------------------------------------------

def test_validate_names_the_truncated_and_the_edited_file(exported_run: Path, tmp_path: Path):
    run = Path(shutil.copytree(exported_run, tmp_path / "run"))
    _truncate(run / "student_int8.tflite", 0.6)
    _flip_byte(run / "student_dynamic.onnx", 300)  # same size: only the sha256 tells
    res = CliRunner().invoke(cli, ["validate", "--run", str(run), "-q"])
    assert res.exit_code == 1, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: ")
    assert f"{run / 'student_dynamic.onnx'} changed since it was written (sha256 mismatch)" in line
    assert f"{run / 'student_int8.tflite'} changed since it was written (" in line and "truncated" in line
    assert "re-run `edgekd export`" in line
    # Nothing was measured or recorded.
    assert not (run / "validate.json").exists()
    assert json.loads((run / "manifest.json").read_text())["stages"].get("validate") is None
    # Only the damaged files are named; restoring them makes validate pass again.
    for name in ("student_int8.tflite", "student_dynamic.onnx"):
        shutil.copy(exported_run / name, run / name)
    res = CliRunner().invoke(cli, ["validate", "--run", str(run), "-q", "--runtime", "onnxruntime"])
    assert res.exit_code == 0, res.output


def test_validate_checks_the_files_it_relies_on(exported_run: Path, tmp_path: Path):
    """eval.npz and the reference checkpoints count too, and the sha256 in metadata.json is checked as well."""
    run = Path(shutil.copytree(exported_run, tmp_path / "run"))
    _flip_byte(run / "eval.npz", 500)
    res = CliRunner().invoke(cli, ["validate", "--run", str(run), "-q", "--runtime", "litert"])
    assert res.exit_code == 1 and "eval.npz changed since it was written" in res.output
    assert "re-run `edgekd distill`" in res.output
    shutil.copy(exported_run / "eval.npz", run / "eval.npz")
    # A file whose manifest entry was "fixed up" by hand still differs from metadata.json.
    _flip_byte(run / "student_fp32.tflite", 100)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["artifacts"].pop("student_fp32.tflite")
    (run / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(cli, ["validate", "--run", str(run), "-q", "--runtime", "litert"])
    assert res.exit_code == 1 and "student_fp32.tflite changed since it was written" in res.output


def test_tampered_file_without_a_record_is_not_flagged(tiny_run: Path, tmp_path: Path):
    """Files no record covers (e.g. history.csv for validate) are not checked; the normal path stays green."""
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "history.csv").write_text("edited\n")
    res = CliRunner().invoke(cli, ["validate", "--run", str(run), "-q", "--runtime", "torch"])
    assert res.exit_code == 0, res.output
    # Not flagged: no error or warning line, nothing about the edited file or about changed files ...
    assert not [ln for ln in res.output.splitlines() if ln.lower().startswith(("error", "warning"))], res.output
    assert "history.csv" not in res.output and "changed since" not in res.output, res.output
    # ... the check ran to its end and recorded every model it validated, and the edit was left alone.
    assert "recommended: " in res.output
    rows = json.loads((run / "validate.json").read_text())["rows"]
    assert {row["file"] for row in rows} == {"teacher.pt", "baseline.pt", "student.pt"}, rows
    assert (run / "history.csv").read_text() == "edited\n"


def test_environment_errors_are_one_line_and_bugs_say_so():
    """The CLI group's answer to OSErrors raised by a command: disk full is bad input, an unexpected one a bug.

    The command raises the error the way a full disk makes ``write()`` raise it (no model to fill a real disk).
    """
    import errno

    import click

    from edgekd.cli import EdgeKDGroup

    @click.group(cls=EdgeKDGroup)
    def group() -> None:
        pass

    @group.command()
    @click.argument("code", type=int)
    def fail(code: int) -> None:
        raise OSError(code, __import__("os").strerror(code), "/runs/x/student.pt")

    full = CliRunner().invoke(group, ["fail", str(errno.ENOSPC)])
    assert full.exit_code == 2 and full.output.strip() == (
        "error: cannot write /runs/x/student.pt: No space left on device (free some space or choose another "
        "--out/--dest)")
    odd = CliRunner().invoke(group, ["fail", str(errno.EIO)])
    assert odd.exit_code == 1 and odd.output.startswith("error: internal error OSError") and "--debug" in odd.output
    assert len(odd.output.strip().splitlines()) == 1 and "Traceback" not in odd.output
