"""Every command of the CLI (listed from the typer app, so a new one is covered) goes through the one error wrapper:
a bad argument ends in one line and exit 2, never a traceback or a silent exit 0; file-system faults name the path."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.main import get_command

from hostile_helpers import run_cli, snapshot
from instructune.cli import app, handles_errors


def commands() -> list[tuple[list[str], object]]:
    """(command words, click command) for every command, nested groups included."""
    out = []

    def walk(cmd, words):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, words + [name])
        else:
            out.append((words, cmd))
    walk(get_command(app), [])
    return out


def test_every_command_is_wrapped():
    wrapper = handles_errors(lambda: None).__code__
    bare = [" ".join(w) for w, cmd in commands()
            if getattr(getattr(cmd.callback, "__wrapped__", cmd.callback), "__code__", None) is not wrapper
            and getattr(cmd.callback, "__code__", None) is not wrapper]
    assert {" ".join(w) for w, _ in commands()} >= {"run", "train", "predict", "export", "templates", "demo-data",
                                                    "data lint"}
    assert not bare, f"commands without handles_errors: {bare}"


@pytest.mark.parametrize("words", [w for w, _ in commands()], ids=lambda w: " ".join(w))
def test_every_command_refuses_a_bad_argument_in_one_line(tmp_path, monkeypatch, words):
    """Every required parameter (and the first argument) gets an existing file that is no config, model, run,
    records or folder: each command must say so in one line, exit 2, and write nothing."""
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("{{{ this is not what any command reads\n")
    command = get_command(app)
    for w in words:
        command = command.commands[w]
    args, first = [*words], True
    for p in command.params:
        if p.param_type_name == "argument" and (p.required or first):
            args.append(str(bad))
            first = False
        elif p.required:
            args += [p.opts[0], str(bad)]
    before = snapshot(tmp_path)
    code, out = run_cli(*args)
    assert code == 2, out
    assert "Traceback" not in out and [line for line in out.splitlines() if line.startswith("error:")], out
    assert snapshot(tmp_path) == before


@pytest.fixture
def tmpfs(tmp_path):
    from test_faults import tmpfs as fixture  # the real small tmpfs the fault tests mount

    yield from fixture.__wrapped__(tmp_path)


def test_demo_data_into_a_read_only_file_system_names_the_path(tmpfs):
    fs = tmpfs("1m", readonly=True)
    code, out = run_cli("demo-data", fs / "demo")
    assert code == 1 and str(fs / "demo") in out and "Read-only file system" in out, out
    assert "Traceback" not in out and "internal error" not in out


def test_a_full_disk_during_a_library_write_names_the_path(tmp_path, tmpfs):
    """safetensors reports a full disk as its own exception type: the message still names the folder."""
    import torch
    from safetensors.torch import save_file

    from instructune.io import replaced_folder

    fs = tmpfs("64k")
    target = fs / "weights"
    with pytest.raises(OSError) as e:
        with replaced_folder(target) as tmp:
            save_file({"w": torch.zeros(100_000)}, str(Path(tmp) / "model.safetensors"))
    assert e.value.filename == str(target) and "No space left" in e.value.strerror
    assert not list(fs.iterdir())


@pytest.mark.parametrize("argv, names", [
    (["sweep", "x.yaml", "--trials", "0"], "'--trials'"),         # out of its range
    (["sweep", "x.yaml", "--trials", "many"], "'--trials'"),      # wrong type
    (["data", "lint", "x.yaml", "--no-such-flag"], "--no-such-flag"),
    (["no-such-command"], "no-such-command"),
    (["train"], "'config'"),                                      # a missing argument
], ids=["range", "type", "option", "command", "missing"])
def test_usage_errors_are_one_line_from_the_installed_command(tmp_path, monkeypatch, capsys, argv, names):
    """What `instructune` (the console script: cli.main) prints for a bad option is one line naming it, exit 2, as
    for every other bad input; typer alone would draw a several-line box."""
    from instructune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["instructune", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    code = exited.value.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: instructune") and names in err, err
    assert list(tmp_path.iterdir()) == []


def test_help_and_a_bare_group_from_the_installed_command(monkeypatch, capsys):
    from instructune.cli import main

    for argv, status, usage in ((["--help"], 0, "Usage: instructune [OPTIONS]"), (["data"], 2, "Usage: instructune data")):
        monkeypatch.setattr("sys.argv", ["instructune", *argv])
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == status and capsys.readouterr().out.count(usage) == 1


def test_an_abort_and_a_closed_pipe_end_without_a_traceback(monkeypatch, capsys):
    """click's Abort (Ctrl-C at a prompt) is "interrupted", exit 130; `instructune --help | head -1` closing the pipe
    ends the command without a traceback (the except clauses once named an Abort typer's click does not have, so
    any exception reaching them, rich's SystemExit on a broken pipe included, became an AttributeError)."""
    import os
    import subprocess
    import sys

    import typer

    from instructune import cli

    def abort(**kwargs):
        raise typer.Abort()

    monkeypatch.setattr(cli, "app", abort)
    monkeypatch.setattr("sys.argv", ["instructune", "run", "x.yaml"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
    with subprocess.Popen([sys.executable, "-m", "instructune.cli", "--help"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env={**os.environ, "INSTRUCTUNE_ALLOCATOR": "system"}) as p:
        p.stdout.close()  # closed before the command writes a byte: its write fails with EPIPE
        err = p.stderr.read().decode()
    assert "Traceback" not in err and p.returncode != 0, err[-2000:]
