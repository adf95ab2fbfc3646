from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekd.errors import RecipeError
from edgekd.recipe import Recipe, load_recipe, save_recipe

from conftest import write_recipe


def test_default_recipe_loads_and_is_mnist():
    r = load_recipe(None)
    assert r.name == "mnist" and r.data.dataset == "mnist"
    assert r.distill.baseline is True
    assert r.distill.loss["name"] == "kd"


def test_builtin_recipe_by_name():
    assert load_recipe("mnist").name == "mnist"


def test_unknown_key_suggests_closest(tmp_path):
    p = write_recipe(tmp_path / "r.yaml", distill={"epoch": 3})
    with pytest.raises(RecipeError, match=r"unknown key 'distill.epoch'.*did you mean 'distill.epochs'"):
        load_recipe(p)


def test_unknown_section_suggests_closest(tmp_path):
    p = write_recipe(tmp_path / "r.yaml", studnet={"model": "cnn"})
    with pytest.raises(RecipeError, match="did you mean 'student'"):
        load_recipe(p)


def test_wrong_type_names_key_and_value(tmp_path):
    p = write_recipe(tmp_path / "r.yaml", distill={"epochs": "many"})
    with pytest.raises(RecipeError, match=r"distill.epochs.*'many'"):
        load_recipe(p)


def test_set_overrides_are_typed(tiny_recipe):
    r = load_recipe(tiny_recipe, ["distill.epochs=7", "distill.loss.temperature=2.5", "distill.baseline=false",
                                  "student.kwargs.width=3", "data.image_size=[8, 8]"])
    assert r.distill.epochs == 7 and isinstance(r.distill.epochs, int)
    assert r.distill.loss["temperature"] == 2.5
    assert r.distill.baseline is False
    assert r.student.kwargs["width"] == 3
    assert r.data.image_size == [8, 8]


def test_set_wrong_type_and_unknown_key(tiny_recipe):
    with pytest.raises(RecipeError, match="distill.lr"):
        load_recipe(tiny_recipe, ["distill.lr=fast"])
    with pytest.raises(RecipeError, match="did you mean 'distill.epochs'"):
        load_recipe(tiny_recipe, ["distill.epochz=2"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(tiny_recipe, ["distill.epochs"])


def test_name_and_seed_options_override(tiny_recipe):
    r = load_recipe(tiny_recipe, name="other", seed=5)
    assert (r.name, r.seed) == ("other", 5)


@pytest.mark.parametrize("text,match", [
    ("", "is empty"),
    ("data: [1, 2\n", "not valid YAML at line"),
    ("- a\n- b\n", "must be a mapping"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
])
def test_bad_yaml(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path, tiny_recipe):
    r = load_recipe(tiny_recipe, ["distill.epochs=9"])
    save_recipe(r, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == r
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["distill"]["epochs"] == 9


def test_every_recipe_in_repo_is_valid():
    for path in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        assert isinstance(load_recipe(path), Recipe), path


def test_readme_documents_every_key():
    readme = (Path(__file__).parents[1] / "recipes" / "README.md").read_text()
    from edgekd.recipe import _model_of

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            sub = _model_of(field.annotation)
            yield key
            if sub is not None:
                yield from keys(sub, key + ".")

    missing = [k for k in keys(Recipe) if f"`{k}`" not in readme]
    assert not missing, f"recipes/README.md does not document: {missing}"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_set_parsing_never_crashes(text):
    from edgekd.recipe import apply_override

    raw = {"distill": {"epochs": 1}}
    try:
        apply_override(raw, text)
        Recipe.model_validate(raw)
    except RecipeError:
        pass
    except Exception as e:  # pydantic errors are wrapped by load_recipe; here only the parser is under test
        from pydantic import ValidationError

        assert isinstance(e, ValidationError), repr(e)


# -- the recipe loader never fails with anything but a RecipeError ----------------------------------------

_SECTIONS = ["name", "seed", "data", "teacher", "teachers", "student", "distill", "prune", "export", "validate",
             "bench"]
_KEYS = _SECTIONS + ["dataset", "path", "epochs", "lr", "loss", "temperature", "alpha", "model", "kwargs",
                     "checkpoint", "val_fraction", "test_fraction", "image_size", "weight", "tolerance", "quantize",
                     "formats", "threads", "scope", "max_size_kb", "ratio", "protect"]
# Scalars that trip YAML or the schema: impossible dates and bad tagged numbers (Python constructors raise
# ValueError), huge and non-finite numbers, unhashable keys, anchors, python tags, tabs, bytes.
_NASTY = ["1", "-1", "0", "abc", "[1, 2]", "{a: 1}", "null", "~", "2001-02-30", "2001-13-01", "!!int 0x",
          "!!float abc", "!!binary aGk=", "!!set {1}", "1e400", ".nan", "-.inf", "0x1F", "&a 3", "*a", "*b",
          "!!python/object/apply:os.system [ls]", "'unterminated", "[", "}", "? [a]", "\t1", "yes", "2001-02-03",
          "!!timestamp x", "[[[[[]]]]]", "\"\\x\"", "- - -", "true", "[1, [2, [3]]]", "{kd: {alpha: 2}}"]


@st.composite
def _yamlish(draw) -> str:
    """Lines of `key: value`, list items and free text, at random indentation."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        indent = " " * draw(st.sampled_from([0, 0, 2, 4, 1]))
        kind = draw(st.integers(0, 3))
        if kind == 0:
            lines.append(f"{indent}{draw(st.sampled_from(_KEYS))}:")
        elif kind == 1:
            lines.append(f"{indent}{draw(st.sampled_from(_KEYS))}: {draw(st.sampled_from(_NASTY))}")
        elif kind == 2:
            lines.append(f"{indent}- {draw(st.sampled_from(_NASTY))}")
        else:
            lines.append(indent + draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


_scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
            | st.text(max_size=8) | st.sampled_from(["kd", "cnn", "digits", "npz", "int8", "onnx", "any", "all"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner, max_size=4),
                       max_leaves=12)


def _loads_or_recipe_error(path: Path, overrides: tuple[str, ...] = ()) -> None:
    try:
        assert isinstance(load_recipe(path, overrides), Recipe)
    except RecipeError as e:
        assert str(e) and "\n" not in str(e).strip(), str(e)


@settings(max_examples=150, deadline=None)
@given(st.one_of(_yamlish(), st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)))
def test_loader_on_arbitrary_yamlish_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_recipe_error(path)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(_SECTIONS) | st.text(max_size=6), _values, max_size=5),
       st.lists(st.tuples(st.sampled_from(_SECTIONS), st.sampled_from(_KEYS), st.sampled_from(_NASTY)), max_size=2))
def test_loader_on_arbitrary_nested_dicts(tmp_path_factory, changes, sets):
    """The tiny recipe with sections replaced or merged with random data (and random --set), through the file."""
    from conftest import TINY_RECIPE

    raw = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    _loads_or_recipe_error(path, tuple(f"{s}.{k}={v}" for s, k, v in sets))


@pytest.mark.parametrize("text", ["seed: 2001-02-30\n", "distill: {epochs: !!int 0x}\n", "data: [\n",
                                  "name: [1, 2]\n", "? [a]\n: 1\n", "teachers: [{model: cnn}, {weight: -1}]\n"])
def test_cli_answers_broken_recipes_in_one_line(tmp_path, text):
    from click.testing import CliRunner

    from edgekd.cli import cli

    path = tmp_path / "broken.yaml"
    path.write_text(text)
    res = CliRunner().invoke(cli, ["distill", str(path), "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert "broken.yaml" in res.output and not (tmp_path / "out").exists()
