"""The MCU target: a full-integer file run in TensorFlow Lite Micro's interpreter, and its firmware sources."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tflite_micro", reason="the MCU target needs the tflite-micro wheel (edgekd[mcu])")

from edgekd.errors import CheckFailed, ExportError  # noqa: E402
from edgekd.export import firmware  # noqa: E402
from edgekd.export import metadata as meta_mod  # noqa: E402
from edgekd.export.mcu import (check_mcu_model, firmware_arena, mcu_bytes, model_ops, same_accuracy,  # noqa: E402
                               tflm_ops, verify_mcu, write_mcu)
from edgekd.runtimes.tflm import load_interpreter, measure_arena  # noqa: E402

GXX = shutil.which("g++")


@pytest.fixture(scope="module")
def int8_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run with a static int8 TFLite student (float32 I/O, the export default)."""
    from edgekd.export import run_export

    run = tmp_path_factory.mktemp("mcu") / "run"
    shutil.copytree(tiny_run, run)
    run_export(run, formats=["tflite"], quantize=["int8"], teacher=False, verify=False)
    return run


def _entry(run: Path, path: Path) -> dict:
    base = next(e for e in json.loads((run / "metadata.json").read_text())["models"]
                if e["file"] == "student_int8.tflite")
    return meta_mod.build_entry(path, "student", "int8", base["input"]["layout"], base["normalization"],
                                base["labels"], "mcu")


@pytest.fixture(scope="module")
def mcu_file(int8_run) -> tuple[Path, dict, list[str]]:
    path = int8_run / "student_mcu.tflite"
    ops = write_mcu(int8_run / "student_int8.tflite", path, "int8")
    return path, _entry(int8_run, path), ops


@pytest.mark.parametrize("io_type", ["int8", "uint8"])
def test_mcu_file_runs_in_tflm_with_litert_accuracy(int8_run, tmp_path, io_type):
    path = tmp_path / "student_mcu.tflite"
    int8_file = int8_run / "student_int8.tflite"
    ops = write_mcu(int8_file, path, io_type)
    entry = _entry(int8_run, path)
    # The float32 boundary of the int8 file is gone: the firmware feeds and reads integers.
    assert entry["input"]["dtype"] == io_type and entry["output"]["dtype"] == io_type
    assert entry["input"]["quantization"]["scale"] > 0
    assert ("QUANTIZE" in ops) == (io_type == "uint8") and "DEQUANTIZE" not in ops
    # Only the input's and output's names are kept: the module-path names are flash the board never reads.
    assert path.stat().st_size < 0.8 * int8_file.stat().st_size
    with np.load(int8_run / "eval.npz") as ev:
        x, y = ev["x"], ev["y"]
    result = verify_mcu(path, entry, x, y).as_dict()
    assert result["tflm_accuracy"] == result["litert_accuracy"]
    assert result["tflm_accuracy"] > 0.15  # above chance (10 digits): the file computes, not just loads
    assert 0 < result["arena_used_bytes"] <= result["arena_min_bytes"] < result["arena_firmware_bytes"]
    assert result["arena_firmware_bytes"] % 1024 == 0
    assert result["ops"] == ops


def test_int8_io_is_the_same_model_whatever_the_int8_files_io(int8_run, tmp_path):
    """The MCU file does not depend on export.int8_io: the boundary ops are taken off, the rest is kept."""
    from edgekd.export.tflite import retype_io

    int8_io = mcu_bytes((int8_run / "student_int8.tflite").read_bytes(), "int8", keep_names=True)
    expected = mcu_bytes(int8_io, "int8")
    for io_type in ("float32", "uint8"):
        assert mcu_bytes(retype_io(int8_io, io_type), "int8") == expected


def test_arena_minimum_is_the_smallest_arena_that_loads(mcu_file):
    path, _, _ = mcu_file
    data = path.read_bytes()
    arena = measure_arena(data)
    load_interpreter(data, arena.minimum)
    with pytest.raises(ExportError, match="cannot load"):
        load_interpreter(data, arena.minimum - 1)
    assert firmware_arena(arena.minimum) >= arena.minimum + 1024


def test_float_file_is_refused_in_one_line(int8_run):
    with pytest.raises(ExportError) as err:
        check_mcu_model((int8_run / "student_fp32.tflite").read_bytes(), "student_fp32.tflite")
    msg = str(err.value)
    assert msg.startswith("student_fp32.tflite is a float model (float32), not full-integer")
    assert "add int8 to export.quantize" in msg and "\n" not in msg


def _with_opcode(data: bytes, old: str, new: str) -> bytes:
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(data))
    for oc in model.operatorCodes:
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == getattr(fb.BuiltinOperator, old):
            oc.builtinCode = oc.deprecatedBuiltinCode = getattr(fb.BuiltinOperator, new)
    return bytes(fu.convert_object_to_bytearray(model))


def test_operator_tflm_lacks_is_named(mcu_file):
    """A real file whose MEAN is turned into TOPK_V2, an op TFLM has no kernel for: both the op table check
    and TFLM's interpreter name it."""
    assert "TOPK_V2" not in tflm_ops()
    path, _, ops = mcu_file
    assert "MEAN" in ops
    bad = _with_opcode(path.read_bytes(), "MEAN", "TOPK_V2")
    with pytest.raises(ExportError, match=r"^bad.tflite uses operator TOPK_V2, which TensorFlow Lite Micro"):
        check_mcu_model(bad, "bad.tflite")
    with pytest.raises(ExportError, match="operator TOPK_V2"):
        load_interpreter(bad, 1 << 20, "bad.tflite")


@pytest.fixture(scope="module")
def sources(mcu_file, tmp_path_factory) -> Path:
    path, entry, ops = mcu_file
    arena = measure_arena(path.read_bytes()).as_dict()
    arena.update(arena_firmware_bytes=firmware_arena(arena["arena_min_bytes"]), arena_headroom=0.25)
    out = tmp_path_factory.mktemp("fw") / "mcu"
    firmware.write_firmware(out, path, entry, ops, arena, methods=tflm_ops(), run="tiny", tflm="tflite-micro",
                            tflm_accuracy=0.5)
    return out


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_model_array_compiles_and_holds_the_file_bytes(mcu_file, sources, tmp_path):
    path, _, _ = mcu_file
    cc = sources / "student_model_data.cc"
    assert "alignas(16) const unsigned char g_student_model[]" in cc.read_text()
    subprocess.run([GXX, "-std=c++17", "-c", str(cc), "-o", str(tmp_path / "model.o")], check=True)
    main = tmp_path / "dump.cc"
    main.write_text('#include <cstdio>\n#include <cstdint>\n#include "student_model_data.h"\n'
                    "int main(int, char** argv) {\n"
                    "  if (reinterpret_cast<std::uintptr_t>(g_student_model) % 16) return 3;\n"
                    '  FILE* f = std::fopen(argv[1], "wb");\n'
                    "  std::fwrite(g_student_model, 1, g_student_model_len, f);\n"
                    "  return std::fclose(f);\n}\n")
    exe = tmp_path / "dump"
    subprocess.run([GXX, "-std=c++17", f"-I{sources}", str(main), str(tmp_path / "model.o"), "-o", str(exe)],
                   check=True)
    subprocess.run([str(exe), str(tmp_path / "out.tflite")], check=True)
    assert (tmp_path / "out.tflite").read_bytes() == path.read_bytes()


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_ops_header_registers_exactly_the_models_operators(mcu_file, sources, tmp_path):
    """The generated header is compiled against a resolver with every Add method of TFLM's resolver that
    prints what is called: the calls must be the model's operators, each once, and N their count."""
    path, _, _ = mcu_file
    ops = model_ops(path.read_bytes())
    stub = tmp_path / "tensorflow" / "lite" / "micro" / "micro_mutable_op_resolver.h"
    stub.parent.mkdir(parents=True)
    methods = "\n".join(f'  TfLiteStatus {m}() {{ std::printf("%d {op}\\n", N); return kTfLiteOk; }}'
                        for op, m in tflm_ops().items())
    stub.write_text("#include <cstdio>\nenum TfLiteStatus { kTfLiteOk, kTfLiteError };\nnamespace tflite {\n"
                    f"template <unsigned int N> class MicroMutableOpResolver {{\n public:\n{methods}\n}};\n}}\n")
    main = tmp_path / "main.cc"
    main.write_text('#include "student_ops.h"\n'
                    "int main() { StudentOpResolver r; return RegisterStudentOps(r) == kTfLiteOk ? 0 : 1; }\n")
    exe = tmp_path / "ops"
    subprocess.run([GXX, "-std=c++17", f"-I{tmp_path}", f"-I{sources}", str(main), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    called = lines[1::2]
    assert called == ops and len(set(called)) == len(called)
    assert set(lines[0::2]) == {str(len(ops))}


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_settings_header_compiles_with_the_files_quantization(mcu_file, sources, tmp_path):
    _, entry, _ = mcu_file
    main = tmp_path / "main.cc"
    main.write_text('#include <cstdio>\n#include "student_settings.h"\n'
                    'int main() { std::printf("%zu %.9g %d %d %s\\n", kStudentArenaSize, kStudentInputScale, '
                    "kStudentInputZeroPoint, kStudentNumClasses, kStudentLabels[kStudentNumClasses - 1]); }\n")
    exe = tmp_path / "settings"
    subprocess.run([GXX, "-std=c++17", "-Wall", "-Werror", f"-I{sources}", str(main), "-o", str(exe)], check=True)
    arena, scale, zp, n, last = subprocess.run([str(exe)], check=True, capture_output=True,
                                               text=True).stdout.split()
    q = entry["input"]["quantization"]
    assert int(arena) % 1024 == 0 and int(arena) > 1024
    assert float(scale) == pytest.approx(q["scale"], rel=1e-6) and int(zp) == q["zero_point"]
    assert int(n) == len(entry["labels"]) and last == entry["labels"][-1]
    readme = (sources / "README.md").read_text()
    for platform in ("Arduino", "ESP-IDF", "Zephyr", "STM32"):
        assert platform in readme
    assert re.search(rf"kStudentArenaSize` = {arena} bytes", readme)


def test_c_string_escapes_quotes_and_non_ascii():
    assert firmware.c_string('a"b\\c') == r'"a\"b\\c"'
    assert firmware.c_string("é?") == r'"\303\251\077"'
    assert firmware.c_identifier("1-net") == "m_1_net"


def test_accuracy_mismatch_names_file_and_difference():
    y = np.array([0, 1, 2, 3])
    assert same_accuracy("m.tflite", np.array([0, 1, 0, 0]), np.array([0, 0, 2, 0]), y) == (0.5, 0.5)
    with pytest.raises(CheckFailed) as err:
        same_accuracy("m.tflite", np.array([0, 1, 2, 0]), np.array([0, 1, 0, 0]), y)
    assert str(err.value).startswith("m.tflite: TFLM accuracy 0.7500 differs from LiteRT's 0.5000 on the same "
                                     "file (by +0.2500; 1 of 4 predictions differ)")
    # Rare rounding differences between the two interpreters' kernels pass: 2 of 10,000 predictions.
    y = np.arange(10_000) % 10
    litert = y.copy()
    tflm = y.copy()
    tflm[:2] = (y[:2] + 1) % 10
    assert same_accuracy("m.tflite", tflm, litert, y) == (0.9998, 1.0)
    tflm[:11] = (y[:11] + 1) % 10  # 11 of 10,000: more than 0.1%
    with pytest.raises(CheckFailed):
        same_accuracy("m.tflite", tflm, litert, y)


# -- the mcu format through the commands ---------------------------------------------------------------------

def _set_export(run: Path, **export) -> None:
    import yaml

    from edgekd.run_dir import RunDir

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    # The tiny run's 3-epoch width-2 student is barely above chance: its int8 agreement measures noise.
    recipe["export"] = {"tolerance": {"min_agreement": 0.9, "max_accuracy_drop": 0.05}, "teacher": False, **export}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # As if the run had been made with this recipe (validate checks recipe.yaml against the manifest).
    RunDir(run).record_artifacts("recipe.yaml")


def _cli(*args: str):
    from click.testing import CliRunner

    from edgekd.cli import cli

    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def mcu_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported by `edgekd export --mcu` (int8 TFLite + MCU file, uint8 MCU I/O)."""
    run = tmp_path_factory.mktemp("mcu-cli") / "run"
    shutil.copytree(tiny_run, run)
    _set_export(run, formats=["onnx"], quantize=["int8"], mcu_io="uint8")
    res = _cli("export", "--run", str(run), "--mcu")
    assert res.exit_code == 0, res.output
    return run


def test_export_writes_the_mcu_file_its_arena_and_firmware(mcu_run):
    meta = {e["file"]: e for e in json.loads((mcu_run / "metadata.json").read_text())["models"]}
    entry = meta["student_mcu.tflite"]
    assert entry["target"] == "mcu" and entry["input"]["dtype"] == "uint8" and entry["verified"] is True
    m = entry["mcu"]
    assert m["tflm_accuracy"] == m["litert_accuracy"]
    assert m["arena_used_bytes"] <= m["arena_min_bytes"] < m["ram_bytes"] == m["arena_firmware_bytes"]
    assert m["flash_bytes"] == entry["size_bytes"] == (mcu_run / "student_mcu.tflite").stat().st_size
    manifest = json.loads((mcu_run / "manifest.json").read_text())["artifacts"]
    for rel in m["firmware"]:
        assert (mcu_run / rel).is_file() and rel in manifest
    assert f"{m['arena_firmware_bytes']};" in (mcu_run / "mcu" / "student_settings.h").read_text()
    metrics = json.loads((mcu_run / "metrics.json").read_text())["student_mcu.tflite"]
    assert metrics["test_accuracy"] == m["tflm_accuracy"] and metrics["ram_bytes"] == m["ram_bytes"]


def test_validate_flash_and_ram_budgets(mcu_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mcu_run, run)
    m = json.loads((run / "metadata.json").read_text())["models"]
    mcu = next(e["mcu"] for e in m if "mcu" in e)
    ok = _cli("validate", "--run", str(run), "-q", "--set", f"validate.max_flash_kb={mcu['flash_bytes'] / 1024 + 1}",
              "--set", f"validate.max_ram_kb={mcu['ram_bytes'] / 1024}")
    assert ok.exit_code == 0, ok.output
    assert "budgets: passed" in ok.output
    flash = _cli("validate", "--run", str(run), "-q", "--set", "validate.max_flash_kb=1")
    assert flash.exit_code == 1, flash.output
    last = flash.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "student_mcu.tflite (tflm): flash" in last
    assert "> 1 KB (validate.max_flash_kb)" in last and "RAM" not in last
    ram = _cli("validate", "--run", str(run), "-q", "--set", "validate.max_ram_kb=1")
    assert ram.exit_code == 1 and "RAM" in ram.output and "(validate.max_ram_kb)" in ram.output


def test_report_shows_flash_ram_and_boards(mcu_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mcu_run, run)
    assert _cli("validate", "--run", str(run), "-q").exit_code == 0
    res = _cli("report", "--run", str(run))
    assert res.exit_code == 0, res.output
    md = (run / "report.md").read_text()
    m = next(e["mcu"] for e in json.loads((run / "metadata.json").read_text())["models"] if "mcu" in e)
    assert "## Microcontrollers (TensorFlow Lite Micro)" in md
    row = next(line for line in md.splitlines() if line.startswith("| student_mcu.tflite") and "uint8" in line)
    assert f"| {m['arena_min_bytes'] / 1024:.1f} |" in row and "Arduino Nano 33 BLE Sense" in row
    assert "| Arduino Uno R4 Minima | Renesas RA4M1 | 256 | 32 |" in md
    if "ethos_u_estimate" in m:  # with ethos-u-vela installed (the test extra has it)
        assert "Vela's estimate (a performance model, not a measurement)" in md
        assert f"| {m['ethos_u_estimate']['cycles']} |" in md


def test_validate_runs_the_mcu_file_in_tflm_too(mcu_run, tmp_path):
    """TFLM is a registered runtime: validate fans the MCU file out to it (and only that file) beside LiteRT."""
    run = tmp_path / "run"
    shutil.copytree(mcu_run, run)
    res = _cli("validate", "--run", str(run), "-q", "--runtime", "tflm,litert")
    assert res.exit_code == 0, res.output
    rows = json.loads((run / "validate.json").read_text())["rows"]
    assert {r["file"] for r in rows if r["runtime"] == "tflm"} == {"student_mcu.tflite"}
    tflm = next(r for r in rows if r["runtime"] == "tflm")
    mcu = next(e for e in json.loads((run / "metadata.json").read_text())["models"] if e["file"] == "student_mcu.tflite")
    assert mcu["backend"] == "mcu" and tflm["test_accuracy"] == mcu["mcu"]["tflm_accuracy"]
    assert {r["runtime"] for r in rows if r["file"] == "student_mcu.tflite"} == {"tflm", "litert"}


def test_bundle_carries_the_firmware(mcu_run, tmp_path):
    from edgekd.bundle import make_bundle

    run = tmp_path / "run"
    shutil.copytree(mcu_run, run)
    out = make_bundle(run)
    for name in ("student_model_data.cc", "student_ops.h", "student_settings.h", "README.md"):
        assert (out / "mcu" / name).read_bytes() == (run / "mcu" / name).read_bytes()
    assert (out / "student_mcu.tflite").is_file()


def test_mcu_target_without_int8_is_one_line_exit_2(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _set_export(run, formats=["onnx"], quantize=["fp16"])
    res = _cli("export", "--run", str(run), "--mcu")
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: the MCU target needs the static int8 TFLite file") and "export.quantize" in last
    assert "Traceback" not in res.output and not (run / "student_mcu.tflite").exists()
    assert not (run / "mcu").exists()


GELU_FACTORY = '''
from torch import nn

def net(input_shape, num_classes):
    n = 1
    for s in input_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, 16), nn.GELU(), nn.Linear(16, num_classes))
'''


def test_operator_tflm_lacks_is_one_line_exit_2(tiny_run, tmp_path):
    """A real student with GELU: LiteRT has a quantized GELU kernel, TFLM has none."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_RECIPE, write_recipe

    from edgekd.distill import run_distill
    from edgekd.recipe import load_recipe

    (tmp_path / "gelu_net.py").write_text(GELU_FACTORY)
    teacher = dict(TINY_RECIPE["teacher"], checkpoint=str(tiny_run / "teacher.pt"))
    recipe = write_recipe(tmp_path / "r.yaml", name="gelu", teacher=teacher,
                          student={"model": f"{tmp_path / 'gelu_net.py'}:net", "kwargs": {}},
                          distill={"epochs": 1, "baseline": False})
    run = run_distill(load_recipe(recipe), out=tmp_path / "exported", quiet=True).path
    _set_export(run, formats=["tflite", "mcu"], quantize=["int8"])
    res = _cli("export", "--run", str(run))
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: student_int8.tflite uses operator GELU, which TensorFlow Lite Micro does not have")
    assert not (run / "student_mcu.tflite").exists()


def test_vela_estimates_the_mcu_file_for_ethos_u55(mcu_file):
    from edgekd.export.vela import vela_available, vela_estimate

    if not vela_available():
        pytest.skip("ethos-u-vela is not installed")
    path, _, _ = mcu_file
    est = vela_estimate(path)
    assert est["estimate"] is True and est["accelerator"] == "Ethos_U55_128"
    # Every operator of the small CNN maps to the NPU; the fp32 file has nothing Vela can put there.
    assert est["cycles"] > 0 and est["npu_ops"] > 0 and est["cpu_ops"] == 0
    fp32 = vela_estimate(path.parent / "student_fp32.tflite")
    assert fp32["npu_ops"] == 0 and fp32["cpu_ops"] > 0


def test_board_fit_uses_the_datasheet_table():
    from edgekd.runtimes.boards import board_fit, boards

    table = {b["name"]: b for b in boards()}
    assert table["Arduino Nano 33 BLE Sense"]["flash_kb"] == 1024 and table["Arduino Nano 33 BLE Sense"]["ram_kb"] == 256
    fit = {b["name"]: b for b in board_fit(200 * 1024, 40 * 1024)}
    assert not fit["Arduino Uno R4 Minima"]["fits"]  # 32 KB of RAM < 40 KB arena
    assert fit["Arduino Uno R4 Minima"]["ram_share"] == pytest.approx(1.25)
    assert fit["nRF52832 DK"]["fits"] and fit["ESP32-S3-DevKitC-1 (N8)"]["fits"]
    assert not any(b["fits"] for b in board_fit(64 << 20, 1024))  # 64 MB of flash fits no board listed
