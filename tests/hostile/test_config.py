"""Hostile configs: alias bombs, deep nesting, bad bytes, bad `--set` values, out-of-range seeds, names and output
folders that point at the user's own folders. Each is refused before anything is written, naming the key or line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hostile_helpers import Bounded, refused, run_cli, snapshot, tiny_config, write_config
from instructune.config import MAX_YAML_DEPTH, MAX_YAML_NODES, load_config
from instructune.errors import InstructuneError

BOMB = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"] +
                 [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)])


def _config_text(tmp_path, tiny_model, variables_yaml: str) -> Path:
    """The tiny config with `tasks.0.variables` replaced by raw YAML text (anchors and aliases survive)."""
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["variables"] = {"PLACEHOLDER": 1}
    text = yaml.safe_dump(cfg, sort_keys=False)
    indent = text[:text.index("PLACEHOLDER")].rsplit("\n", 1)[1]
    block = "".join(indent + line + "\n" for line in variables_yaml.splitlines())
    text = text.replace(indent + "PLACEHOLDER: 1\n", block)
    assert block in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _refused_file(tmp_path, config: Path, *fragments, extra=()) -> str:
    before = snapshot(tmp_path)
    code, out = run_cli("run", config, *extra)
    assert code == 2, out
    for fragment in fragments:
        assert fragment in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()
    assert snapshot(tmp_path) == before
    return out


def test_a_billion_laughs_under_task_variables_is_refused_fast_and_small(tmp_path, tiny_model):
    config = _config_text(tmp_path, tiny_model, BOMB)
    with Bounded() as b:
        _refused_file(tmp_path, config, f"expands to more than {MAX_YAML_NODES:,} nodes", "config.yaml:")
    assert b.seconds < 5 and b.grown_mib < 200, (b.seconds, b.grown_mib)


def test_a_recursive_alias_is_refused(tmp_path, tiny_model):
    config = _config_text(tmp_path, tiny_model, "loop: &loop [1, *loop]")
    _refused_file(tmp_path, config, "recursive alias", "config.yaml:")


def test_yaml_nested_10000_deep_is_refused(tmp_path, tiny_model):
    config = _config_text(tmp_path, tiny_model, "deep: " + "[" * 10_000 + "]" * 10_000)
    _refused_file(tmp_path, config, f"nested deeper than {MAX_YAML_DEPTH} levels", "config.yaml:")


def test_aliases_that_nest_past_the_depth_limit_are_refused(tmp_path, tiny_model):
    chain = "\n".join(["b0: &b0 [x]"] + [f"b{i}: &b{i} [*b{i - 1}]" for i in range(1, 80)])
    config = _config_text(tmp_path, tiny_model, chain)
    _refused_file(tmp_path, config, f"nested deeper than {MAX_YAML_DEPTH} levels")


def test_a_few_aliases_are_fine(tmp_path, tiny_model):
    config = _config_text(tmp_path, tiny_model, "a: &a [x, y]\nb: *a")
    assert load_config(config).tasks[0].variables == {"a": ["x", "y"], "b": ["x", "y"]}


def test_a_python_tag_is_not_executed(tmp_path, tiny_model):
    config = _config_text(tmp_path, tiny_model, "x: !!python/object/apply:os.system ['touch pwned']")
    _refused_file(tmp_path, config, "not valid YAML", "config.yaml:")
    assert not Path("pwned").exists()


def test_a_non_utf8_byte_in_the_config_names_its_line(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    lines = config.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].rstrip(b"\n") + b" # caf\xe9\n"
    config.write_bytes(b"".join(lines))
    _refused_file(tmp_path, config, "config.yaml:3", "not UTF-8", "0xe9")


@pytest.mark.parametrize("item, fragment", [
    ("train.lr=[", "--set train.lr: not valid YAML"),
    ("train.lr={a: [}", "--set train.lr: not valid YAML"),
    ("name.x=1", "--set name.x: name is not a mapping"),
    ("tasks.5.name=x", "--set tasks.5.name"),
    ("tasks.0.variables.x=" + "[" * 5000 + "]" * 5000, "--set tasks.0.variables.x: YAML nested deeper"),
    ("noequals", "--set: expected key=value"),
])
def test_a_bad_set_value_names_the_key(tmp_path, tiny_model, item, fragment):
    refused(tmp_path, tiny_config(tmp_path, tiny_model), fragment, extra=("--set", item))


def test_an_alias_bomb_through_set_is_refused(tmp_path, tiny_model):
    bomb = "{" + ", ".join(["a0: &a0 [l, l, l, l, l, l, l, l, l, l]"] +
                           [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]) + "}"
    with Bounded() as b:
        refused(tmp_path, tiny_config(tmp_path, tiny_model), "--set tasks.0.variables", "expands to more than",
                extra=("--set", f"tasks.0.variables={bomb}"))
    assert b.seconds < 5 and b.grown_mib < 200


@pytest.mark.parametrize("seed", [2**64, -1, 2**32])
def test_a_seed_outside_32_bits_is_refused(tmp_path, tiny_model, seed):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["seed"] = seed
    refused(tmp_path, cfg, "(seed)", "4294967295" if seed > 0 else "greater than or equal to 0")


def test_the_largest_seed_is_fine(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["seed"] = 2**32 - 1
    assert load_config(write_config(tmp_path, cfg)).seed == 2**32 - 1


@pytest.mark.parametrize("name, fragment", [("..", "(name)"), (".", "(name)"), ("a/b", "(name)"),
                                            ("../x", "(name)"), ("a\\b", "(name)")])
def test_a_name_that_is_a_path_is_refused(tmp_path, tiny_model, name, fragment):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["name"] = name
    refused(tmp_path, cfg, fragment)


def test_a_task_name_that_is_a_path_is_refused(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["name"] = ".."
    refused(tmp_path, cfg, "(tasks.0.name)", "not a usable name")


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, tiny_model):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["output_dir"] = str(mine)
    refused(tmp_path, cfg, "(output_dir)", "is an existing file")
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("where, fragment", [("/", "the root folder"), ("~", "your home folder"),
                                             (".", "the working directory"), ("CWD/..", "contains the working"),
                                             ("CWD/sub/..", "the working directory")])
def test_root_home_and_working_folder_are_refused(tmp_path, tiny_model, monkeypatch, where, fragment):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["output_dir"] = where.replace("CWD", str(work))
    out = refused(tmp_path, cfg, "(output_dir)", fragment)
    assert "config.yaml:" in out


@pytest.mark.parametrize("choices, fragment", [(["a", " a "], "the choice 'a' is given twice"),
                                               (["a", ""], "a choice is empty"),
                                               (["a", None], "a choice must be a string or an integer")])
def test_bad_choices_are_refused(tmp_path, tiny_model, choices, fragment):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["choices"] = choices
    refused(tmp_path, cfg, "(tasks.0.choices", fragment)


@pytest.mark.parametrize("key, value", [("max_render_chars", 0), ("max_render_seconds", -1), ("max_chars", 5)])
def test_bad_limits_are_refused(tmp_path, tiny_model, key, value):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["limits"] = {key: value}
    refused(tmp_path, cfg, f"(limits.{key})")


def test_an_empty_config_file_is_named(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("")
    with pytest.raises(InstructuneError) as e:
        load_config(config)
    assert "(name)" in e.value.where or "name" in str(e.value)
