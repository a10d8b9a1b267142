"""Every number a user can give has its domain, both ways, refused before anything is written. The cases are
generated from the config's pydantic models and the CLI's typer app, so a new field, option or command is covered
without a test of its own; README.md's table of domains is checked against the same walk.

Checked by hand: removing `le=1e6` from `train.max_grad_norm` (config.py) or `max=65_536` from `predict
--batch-size` (cli.py) fails test_every_config_number_is_bounded / test_every_cli_number_is_bounded_and_refused_
before_anything_is_written, naming the field or option, as does removing any `gt=`/`ge=`."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import annotated_types as at
import pytest
from pydantic import BaseModel
from typer.main import get_command

from hostile_helpers import run_cli, snapshot, tiny_config, write_config
from instructune.cli import app
from instructune.config import ExperimentConfig, load_config
from instructune.errors import InstructuneError

README = Path(__file__).resolve().parents[2] / "README.md"
TRIES = (0, -1, 10**30)  # zero, negative, huge


def _numeric(annotation) -> tuple[bool, bool]:
    """(is a number, inside a list) for an annotation such as `int | None`, `float | Literal['auto']`, `list[float]`;
    a union with free text in it (`str | int`) is no number."""
    if annotation in (int, float):
        return True, False
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _numeric(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        if str in typing.get_args(annotation):
            return False, False
        found = [_numeric(a) for a in typing.get_args(annotation)]
        return any(n for n, _ in found), any(n and inner for n, inner in found)
    if origin in (list, tuple, set):
        return any(_numeric(a)[0] for a in typing.get_args(annotation)), True
    return False, False


def _models(annotation) -> list[tuple[type[BaseModel], str]]:
    """The pydantic models an annotation holds, with the key step into each (`.0` for a list item)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        return [(m, ".0" + step) for a in args for m, step in _models(a)]
    if origin is dict:
        return [(m, ".KEY" + step) for m, step in _models(args[-1])] if args else []
    return [(m, step) for a in args for m, step in _models(a)]


def config_numbers(model: type[BaseModel] = ExperimentConfig, prefix: str = "", seen=None) -> list[tuple]:
    """(dotted key, field info, in a list) for every numeric field reachable from the config (each model once)."""
    seen = set() if seen is None else seen
    seen.add(model)
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        number, in_list = _numeric(info.annotation)
        if number:
            out.append((key, info, in_list))
        for sub, step in _models(info.annotation):
            if sub not in seen:
                out += config_numbers(sub, f"{key}{step}.", seen)
    return out


def _metadata(annotation) -> list:
    """Constraints written into the annotation (`Annotated[float, Field(gt=0)] | Literal['auto']`)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return [m for x in typing.get_args(annotation)[1:] for m in getattr(x, "metadata", [x])]
    return [m for a in typing.get_args(annotation) for m in _metadata(a)]


def field_bounds(info) -> tuple[tuple[str, float] | None, tuple[str, float] | None]:
    """The declared (lower, upper) bounds of a field, each ("gt" | "ge" | "lt" | "le", value) or None."""
    low = high = None
    for m in [*info.metadata, *_metadata(info.annotation)]:
        for attr in ("gt", "ge"):
            if getattr(m, attr, None) is not None and isinstance(m, (at.Gt, at.Ge, at.Interval)):
                low = (attr, getattr(m, attr))
        for attr in ("lt", "le"):
            if getattr(m, attr, None) is not None and isinstance(m, (at.Lt, at.Le, at.Interval)):
                high = (attr, getattr(m, attr))
    return low, high


def inside(value, low, high) -> bool:
    if low is None and high is None:  # bounded by a validator (e.g. `float | auto`): -1 and huge are outside
        return False
    ok_low = value > low[1] if low[0] == "gt" else value >= low[1]
    ok_high = value < high[1] if high[0] == "lt" else value <= high[1]
    return ok_low and ok_high


def cli_numbers() -> list[tuple]:
    """(command words, click parameter) for every numeric option or argument of every command."""
    out = []

    def walk(cmd, words):
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, words + [name])
        for p in getattr(cmd, "params", []) if not hasattr(cmd, "commands") else []:
            if _numeric(p.type_descriptor.annotation)[0]:
                out.append((words, p))
    walk(get_command(app), [])
    return out


def _num(value) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _span(low, high, optional: bool) -> str:
    lo = f"{'(' if low[0] == 'gt' else '['}{_num(low[1])}"
    hi = f"{_num(high[1])}{')' if high[0] == 'lt' else ']'}"
    return f"{lo}, {hi}" + (" or null" if optional else "")


def domain_rows() -> list[str]:
    """README.md's table rows: one per config key and CLI option, its domain."""
    rows = []
    for key, info, _ in config_numbers():
        low, high = field_bounds(info)
        if low and high:
            rows.append(f"| `{key}` | {_span(low, high, 'None' in str(info.annotation))} |")
        else:  # bounded by a validator: the row's domain is written by hand
            rows.append(f"| `{key}` | ")
    for words, p in cli_numbers():
        if p.min is not None and p.max is not None:
            rows.append(f"| `instructune {' '.join(words)} {p.opts[0]}` | [{_num(p.min)}, {_num(p.max)}] |")
    return rows


# -- the config -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid config (the model is never reached: every case is refused before it)."""
    tmp = tmp_path_factory.mktemp("domains")
    return tmp, write_config(tmp, tiny_config(tmp, tmp / "model"))


def test_the_walk_finds_the_numbers_it_must():
    keys = {k for k, _, _ in config_numbers()}
    assert {"seed", "train.lr", "train.max_grad_norm", "tasks.0.data.max_train", "train.lora.r",
            "evaluate.confidence"} <= keys
    options = {(" ".join(w), p.opts[0]) for w, p in cli_numbers()}
    assert {("predict", "--batch-size"), ("export", "--check-limit"), ("chat", "--max-new-tokens")} <= options


def test_every_config_number_is_bounded():
    """Both bounds declared, or neither (a validator bounds it; the next test checks that it refuses)."""
    half = [k for k, info, _ in config_numbers() if (None in field_bounds(info)) and field_bounds(info) != (None, None)]
    assert not half, f"numeric config fields without a lower and an upper bound: {half}"


def test_every_config_number_outside_its_domain_is_refused_naming_the_key(base):
    tmp, config = base
    wrong = []
    for key, info, in_list in config_numbers():
        low, high = field_bounds(info)
        for value in TRIES:
            text = f"[{value}]" if in_list else str(value)
            try:
                load_config(config, [f"{key}={text}"])
                refused = None
            except InstructuneError as e:
                refused = str(e)
            if inside(value, low, high):  # legal here: not refused for itself (the surroundings may be incomplete)
                if refused and f"({key})" in refused:
                    wrong.append(f"{key}={text}: inside its domain, yet {refused}")
            elif refused is None or key not in refused:
                wrong.append(f"{key}={text}: {refused or 'accepted'}")
        if not in_list and str(info.annotation) != "<class 'int'>":
            try:
                load_config(config, [f"{key}=.nan"])
                wrong.append(f"{key}=nan: accepted")
            except InstructuneError:
                pass
    assert not wrong, "\n".join(wrong)


@pytest.fixture
def one_build(monkeypatch):
    """The CLI's click command built once for the many invocations here (typer builds it per call otherwise)."""
    import typer.testing

    built = get_command(app)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _: built)


def test_a_refused_config_number_exits_2_from_the_cli_with_nothing_written(base, one_build):
    """Through the command that would write the most (`run`): exit 2, one line naming the key, nothing written."""
    tmp, config = base
    before = snapshot(tmp)
    for key, info, in_list in config_numbers():
        value = next(v for v in TRIES if not inside(v, *field_bounds(info)))
        value = f"[{value}]" if in_list else value
        code, out = run_cli("run", config, "--set", f"{key}={value}")
        assert code == 2 and key in out and "Traceback" not in out and out.count("error:") == 1, (key, out)
    assert snapshot(tmp) == before and not (tmp / "run").exists()


# -- the command line -----------------------------------------------------------------------------------------------
def test_every_cli_number_is_bounded_and_refused_before_anything_is_written(tmp_path, monkeypatch, one_build):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_text("x")
    wrong = []
    for words, param in cli_numbers():
        name = f"{' '.join(words)} {param.opts[0]}"
        if param.min is None or param.max is None:
            wrong.append(f"{name}: no {'min' if param.min is None else 'max'}")
            continue
        command = get_command(app)
        for w in words:
            command = command.commands[w]
        required = [p for p in command.params if p.required and p is not param]
        for value in TRIES:
            if param.min <= value <= param.max:
                continue
            args = [*words]
            for p in required:  # every other required parameter gets a harmless value; parsing fails first
                args += [p.opts[0], "x"] if p.param_type_name == "option" else ["x"]
            args += [param.opts[0], str(value)] if param.param_type_name == "option" else [str(value)]
            code, out = run_cli(*args)
            if code != 2 or param.opts[0] not in out or "Traceback" in out:
                wrong.append(f"{name} {value}: exit {code}: {out[-200:]}")
    assert not wrong, "\n".join(wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"], "something was written"


def test_the_readme_lists_every_domain():
    text = README.read_text(encoding="utf-8")
    missing = [row for row in domain_rows() if row not in text]
    assert not missing, "README.md's table of domains lacks (or differs from) these rows:\n" + "\n".join(missing)
