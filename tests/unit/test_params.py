"""params.yaml: one schema, defaults, overrides, and errors that name the field and say what to do."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.core.params import Params, flatten, load_params, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_file_is_the_schema_defaults() -> None:
    """Every value in params.yaml is the schema's default, except the nightly zoo, which the schema leaves empty."""
    project = load_params(ROOT / "params.yaml")
    assert [m["model.source"] for m in project.nightly.models] == ["mobilenet_v2_tiny", "resnet_tiny",
                                                                   "mobilenet_v2_tiny"]
    assert project.model_copy(update={"nightly": Params().nightly}) == Params()


def test_required_keys_exist_with_their_defaults() -> None:
    flat = flatten(load_params(ROOT / "params.yaml"))
    for key in ("data.source", "data.image_size", "model.source", "model.weights", "quant.mode", "quant.qconfig",
                "quant.calibration_batches", "qat.epochs", "tidl.target_device", "verify.max_accuracy_drop",
                "output_dir"):
        assert key in flat
    assert flat["data.source"] == "digits"
    assert flat["model.source"] == "mobilenet_v2_tiny"
    assert flat["quant.mode"] == "ptq"
    assert flat["quant.qconfig"] == "tidl"


def test_overrides_are_typed_from_yaml() -> None:
    overrides = parse_overrides(["quant.mode=qat", "qat.epochs=2", "verify.max_accuracy_drop=0.5",
                                 "model.weights=null"])
    assert overrides == {"quant.mode": "qat", "qat.epochs": 2, "verify.max_accuracy_drop": 0.5, "model.weights": None}
    p = load_params(ROOT / "params.yaml", overrides)
    assert (p.quant.mode, p.qat.epochs, p.verify.max_accuracy_drop) == ("qat", 2, 0.5)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"quant.moed": "qat"}, ["unknown key 'quant.moed'", "did you mean 'quant.mode'"]),
    ({"quant.mode": "qta"}, ["quant.mode", "'ptq', 'qat' or 'auto'", "'qta'"]),
    ({"data.image_size": "big"}, ["data.image_size", "integer"]),
    ({"data.image_size": 4}, ["data.image_size", "greater than or equal to 8"]),
    ({"export.opset": 21}, ["export.opset", "less than or equal to 19"]),
    ({"tidl.target_device": "tda5"}, ["tidl.target_device", "am68a"]),
    ({"model.source": "no-such-model"}, ["model.source", "package.module:callable"]),
    ({"data.val_fraction": 0.5, "data.calib_fraction": 0.4}, ["val_fraction + calib_fraction"]),
    ({"model.name": "../escape"}, ["model.name", "letters, digits"]),
])
def test_bad_values_name_the_field(overrides: dict, expected: list[str]) -> None:
    with pytest.raises(UserError) as err:
        load_params(ROOT / "params.yaml", overrides)
    for text in expected:
        assert text in str(err.value)
    assert "--set" in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"quant": {"calibration_batchs": 3}}))
    with pytest.raises(UserError, match=r"params.yaml: unknown key 'quant.calibration_batchs'; did you mean "
                                        r"'quant.calibration_batches'"):
        load_params(path)


@pytest.mark.parametrize("text", ["data: [1, 2", "- a\n- b\n"])
def test_malformed_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="params.yaml"):
        load_params(path)


def test_missing_file_and_bad_set_syntax(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_overrides(["quant.mode"])
    with pytest.raises(UserError, match="is a value, not a section"):
        load_params(ROOT / "params.yaml", {"output_dir.x": 1})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["data.image_size", "quant.mode", "qat.epochs", "verify.min_sqnr_db",
                                        "tidl.calibration_frames", "bogus", "data.seed", "model.kwargs"]),
                       st.one_of(st.none(), st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=8),
                                 st.booleans(), st.lists(st.integers(), max_size=2)), max_size=4))
def test_loader_only_ever_returns_params_or_raises_user_error(overrides: dict) -> None:
    try:
        assert isinstance(load_params(None, overrides), Params)
    except UserError as err:
        assert str(err).startswith("invalid params")


SECTIONS = sorted(Params.model_fields)
KNOWN_KEYS = sorted(set(flatten(Params())) | set(SECTIONS))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.dates())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.one_of(st.sampled_from([k.rsplit(".", 1)[-1] for k in KNOWN_KEYS]), st.text(max_size=6), st.integers()),
    inner, max_size=3), max_leaves=10)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(alphabet="abdemoqstu._", max_size=12))
# Pieces of YAML, including the typed values and tags PyYAML's safe loader chokes on in ways other than YAMLError.
YAML_PIECES = st.sampled_from([
    "data:", "model:", "quant:", "nightly:", "output_dir:", " source:", " image_size:", " kwargs:", " mode:", " seed:",
    " models:", "\n", "\n  ", "- ", "[", "]", "{", "}", ": ", ", ", "&a ", "*a", "!!int ", "!!float ", "!!timestamp ",
    "!!binary ", "!!set ", "!!str ", "!!python/object:os.system ", "2001-13-45", "2024-01-01", ".nan", "-.inf", "1e999",
    "0x1F", "null", "~", "yes", "qat", "'", '"', "#", "? ", "|", ">", "---\n", "...\n", "%YAML 1.1\n", "\t", "\xff",
])


def assert_params_or_user_error(load: Callable[[], Params]) -> None:
    """What the loader returns is a usable Params (it dumps, as tracking and cache keys do); anything else is a
    UserError with a message."""
    try:
        p = load()
    except UserError as err:
        assert str(err).strip()
        return
    assert isinstance(p, Params)
    files.canonical_json(flatten(p))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzzed_overrides_give_params_or_a_user_error(overrides: dict) -> None:
    assert_params_or_user_error(lambda: load_params(ROOT / "params.yaml", overrides))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=5)),
                                 st.one_of(VALUES, st.dictionaries(KEYS.map(lambda k: k.rsplit(".", 1)[-1]), VALUES,
                                                                   max_size=4)), max_size=5).map(yaml.safe_dump),
                 st.lists(YAML_PIECES, max_size=30).map("".join),
                 st.text(max_size=80)))
def test_fuzzed_params_files_give_params_or_a_user_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        assert_params_or_user_error(lambda: load_params(path))


@pytest.mark.parametrize("pairs", [["data.seed=2001-13-45"], ["model.kwargs=!!int x"], ["model.kwargs=&a {x: *a}"]])
def test_set_values_that_pyyaml_cannot_construct(pairs: list[str]) -> None:
    assert_params_or_user_error(lambda: load_params(None, parse_overrides(pairs)))
