"""`edgekd export` with the app profile: app-profile .tflite files beside the research files, checked in
MediaPipe's ImageClassifier, ONNX files with metadata_props, .ort files, batch-1 truth, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from conftest import TINY_RECIPE, write_recipe
from edgekd.cli import cli
from edgekd.export import run_export
from edgekd.export.app_tflite import mediapipe_available
from edgekd.run_dir import RunDir
from edgekd.runtimes import runtime_for

APP_FILES = ["student_app_fp32.tflite", "student_app_dynamic.tflite", "student_app_int8.tflite"]


@pytest.fixture(scope="module")
def app_run(tiny_run, tmp_path_factory):
    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("app") / "tiny"))
    report = run_export(run, quantize="dynamic,int8", teacher=False, ort=True)
    return run, report


def _meta(run: Path) -> dict:
    return {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}


def test_app_files_are_written_and_described(app_run):
    run, report = app_run
    meta = _meta(run)
    assert not report.failures, report.failures
    for name in APP_FILES:
        e = meta[name]
        assert e["profile"] == "app" and e["output_kind"] == "probabilities" and e["pixel_scale"] == 255.0
        assert e["input"]["shape"] == [1, 8, 8, 3] and e["input"]["layout"] == "NHWC"
        assert e["signature_keys"]["serving_default"]["inputs"]
        inside = e["app_normalization"]["inside_graph"]
        data = json.loads((run / "data.json").read_text())["normalization"]
        assert inside["unit"]["mean"] == pytest.approx(data["mean"])
        assert inside["pixels"]["std"] == pytest.approx([255 * s for s in data["std"]])
        assert e["app_normalization"]["client"]["pixels"] == {"mean": [0.0], "std": [1.0]}
    int8 = meta["student_app_int8.tflite"]["input"]
    assert int8["dtype"] == "uint8" and int8["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert "student_fp32.tflite" in meta  # the research files stay


@pytest.mark.skipif(not mediapipe_available(), reason="mediapipe not installed (test extra)")
def test_mediapipe_accuracy_equals_litert_for_every_app_file(app_run):
    run, _ = app_run
    metrics = json.loads((run / "metrics.json").read_text())
    for name in APP_FILES:
        mp = metrics[name]["mediapipe"]
        assert mp["mediapipe_accuracy"] == mp["litert_accuracy"], name
        assert mp["samples"] == len(np.load(run / "eval.npz")["y"])


def test_app_file_accuracy_in_litert_through_metadata_entry(app_run):
    # What bench/validate/device scripts do: raw eval inputs prepared from the metadata.json entry alone.
    run, _ = app_run
    meta, metrics = _meta(run), json.loads((run / "metrics.json").read_text())
    ev = np.load(run / "eval.npz")
    for name in APP_FILES:
        out = runtime_for(run / name, meta[name]).predict(ev["x"], batch_size=1)
        assert float((out.argmax(1) == ev["y"]).mean()) == metrics[name]["test_accuracy"], name
        np.testing.assert_allclose(out.sum(1), 1.0, atol=0.02)  # probabilities


def test_dynamic_files_are_measured_at_batch_1(app_run):
    run, _ = app_run
    meta, metrics = _meta(run), json.loads((run / "metrics.json").read_text())
    ev = np.load(run / "eval.npz")
    for name in ("student_dynamic.onnx", "student_dynamic.ort"):
        one = runtime_for(run / name, meta[name]).predict(ev["x"], batch_size=1)
        assert metrics[name]["test_accuracy"] == float((one.argmax(1) == ev["y"]).mean()), name


def test_onnx_metadata_props_and_ort_files(app_run):
    import onnxruntime as ort

    run, _ = app_run
    meta, metrics = _meta(run), json.loads((run / "metrics.json").read_text())
    labels = (run / "labels.txt").read_text().split()
    for name in ("student_fp32.onnx", "student_int8.onnx"):
        props = ort.InferenceSession(str(run / name)).get_modelmeta().custom_metadata_map
        assert json.loads(props["labels"]) == labels and props["input_layout"] == "NCHW"
        assert props["output"] == "logits" and props["edgekd_version"]
    for prec in ("fp32", "dynamic", "int8"):
        e = meta[f"student_{prec}.ort"]
        assert e["format"] == "ort" and e["source"] == f"student_{prec}.onnx"
        assert metrics[f"student_{prec}.ort"]["test_accuracy"] == metrics[f"student_{prec}.onnx"]["test_accuracy"]
    assert "Conv" in (run / "required_operators.config").read_text()
    assert "required_operators.config" in RunDir(run).manifest()["artifacts"]


def _export(args: list[str]):
    return CliRunner().invoke(cli, ["export", *args], catch_exceptions=False)


def _one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.output
    assert "Traceback" not in result.output


def _with_app_settings(tiny_run: Path, tmp_path: Path, app: dict) -> Path:
    run = Path(shutil.copytree(tiny_run, tmp_path / "tiny"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["export"] = {**(recipe.get("export") or {}), "app": app}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def test_int8_io_in_app_profile_is_refused(tiny_run, tmp_path):
    run = _with_app_settings(tiny_run, tmp_path, {"int8_io": "int8"})
    _one_line_error(_export(["--run", str(run), "--tflite"]), "int8 inputs/outputs cannot be used in the app profile")
    assert not list(run.glob("*.tflite"))  # refused before anything is written


def test_labels_file_with_wrong_count_is_refused(tiny_run, tmp_path):
    labels = tmp_path / "names.txt"
    labels.write_text("zero\none\ntwo\n")
    run = _with_app_settings(tiny_run, tmp_path, {"labels": str(labels)})
    _one_line_error(_export(["--run", str(run), "--tflite"]), "has 3 labels but the model has 10 classes")
    assert not list(run.glob("*.tflite"))


def test_app_profile_for_a_run_without_images_is_refused(tmp_path):
    from edgekd.distill import run_distill
    from edgekd.recipe import load_recipe

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "feats.npz", x=rng.normal(size=(120, 16)).astype(np.float32), y=rng.integers(0, 3, 120))
    recipe = write_recipe(tmp_path / "nf.yaml", data={**TINY_RECIPE, "data": {"dataset": "npz",
                                                                               "path": str(tmp_path / "feats.npz")}},
                          teacher={"model": "mlp", "kwargs": {"hidden": 8, "depth": 1}, "epochs": 1},
                          student={"model": "mlp", "kwargs": {"hidden": 4, "depth": 1}},
                          distill={"epochs": 1})
    rd = run_distill(load_recipe(recipe), out=tmp_path / "exported", quiet=True)
    _one_line_error(_export(["--run", str(rd.path), "--tflite", "--app"]), "the app profile needs an image run")
    assert not list(rd.path.glob("*.tflite"))


# -- docs/app.md "Use it in an app" (the README points to it) ----------------------------------------------

APP_SECTION = (Path(__file__).parents[1] / "docs" / "app.md").read_text()
DEMO_RECIPE = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "mnist.yaml").read_text())


def _snippets(lang: str) -> list[str]:
    import re

    return re.findall(rf"```{lang}\n(.*?)```", APP_SECTION, flags=re.S)


def test_app_snippets_name_the_demo_runs_files():
    from edgekd.export.app_profile import app_file_name

    import re

    # The demo recipe prunes, so its best student is student_pruned; mnist digits are 28x28.
    assert DEMO_RECIPE.get("prune") and DEMO_RECIPE["data"]["dataset"] == "mnist"
    app_file = app_file_name("student_pruned", "int8")
    assert "int8" in DEMO_RECIPE["export"]["quantize"] and "tflite" in DEMO_RECIPE["export"]["formats"]
    for lang in ("kotlin", "python"):
        assert any(app_file in s for s in _snippets(lang)), lang
    assert any('forResource: "student_pruned_app_int8", ofType: "tflite"' in s for s in _snippets("swift"))
    assert any("student_pruned_int8.onnx" in s for s in _snippets("python"))
    names = set(re.findall(r"\b[\w]+\.(?:tflite|onnx|ort)\b", APP_SECTION))
    assert names <= {app_file, "student_pruned_int8.onnx", "student_pruned_int8.ort", "student_int8.tflite"}, names
    assert set(re.findall(r"\((\d+), (\d+)\)", APP_SECTION)) == {("28", "28")}
    demo = Path(__file__).parents[1] / "exported" / "mnist" / "metadata.json"
    if demo.is_file():  # after `make demo` (CI): the snippets' files and sizes are the run's
        meta = {e["file"]: e for e in json.loads(demo.read_text())["models"]}
        assert meta[app_file]["input"]["shape"] == [1, 28, 28, 3]
        assert meta["student_pruned_int8.onnx"]["input"]["shape"][2:] == [28, 28]


@pytest.mark.skipif(not mediapipe_available(), reason="mediapipe not installed (test extra)")
def test_python_app_snippets_run_on_an_exported_run(app_run, tmp_path, monkeypatch):
    from PIL import Image

    run, _ = app_run
    ev = np.load(run / "eval.npz")
    # The tiny run's digit as the app would have it: an 8-bit gray PNG, the class the file predicts.
    Image.fromarray(np.round(ev["x"][0, 0] * 255).astype(np.uint8), mode="L").save(tmp_path / "digit.png")
    for name in ("student_app_int8.tflite", "student_int8.onnx"):
        shutil.copy(run / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    labels = (run / "labels.txt").read_text().split()
    for code in _snippets("python"):
        code = code.replace("student_pruned", "student").replace("(28, 28)", "(8, 8)")
        printed: list[str] = []
        exec(compile(code, "docs/app.md", "exec"), {"print": lambda *a: printed.append(" ".join(map(str, a)))})
        assert printed and printed[0].split()[0] in labels, printed


def test_bundle_carries_app_files_and_ort_config(app_run, tmp_path):
    from edgekd.bundle import make_bundle

    run, _ = app_run
    out = make_bundle(run, tmp_path / "bundle")
    names = {p.name for p in out.iterdir()}
    assert set(APP_FILES) | {"student_int8.ort", "required_operators.config"} <= names
    assert (out / "student_app_int8.tflite").read_bytes() == (run / "student_app_int8.tflite").read_bytes()


@pytest.mark.skipif(not mediapipe_available(), reason="mediapipe not installed (test extra)")
def test_validate_measures_app_files_in_mediapipe_too(app_run, tmp_path):
    from edgekd.validate import run_validate

    run = Path(shutil.copytree(app_run[0], tmp_path / "tiny"))
    result = run_validate(RunDir(run), runtimes=["litert", "mediapipe", "onnxruntime"]).to_json()
    rows = {(r["file"], r["runtime"]): r for r in result["rows"]}
    for name in APP_FILES:
        mp, lite = rows[(name, "mediapipe")], rows[(name, "litert")]
        # LiteRT gets digits' x * 255 unrounded (float files), MediaPipe uint8 bitmaps: a sample may differ here;
        # export compares the two on the same uint8 images and requires equality.
        assert mp["profile"] == "app" and abs(mp["test_accuracy"] - lite["test_accuracy"]) <= 1 / mp["n_eval"], name
    assert not [s for s in result["skipped"] if s["runtime"] == "mediapipe"]
    assert ("student_fp32.tflite", "mediapipe") not in rows  # research files are not MediaPipe's
    assert ("student_int8.ort", "onnxruntime") in rows
