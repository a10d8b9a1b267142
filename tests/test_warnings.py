"""A normal run prints no deprecation warning: the demo's pipeline (five task types, baselines, LoRA training,
evaluation, report, generate) on a tiny model, with FutureWarning an error everywhere and DeprecationWarning an error
where our own code triggers it. Users read such warnings as something being wrong."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import tiny_config, write_config

# warnings.filterwarnings' module is a regular expression matched from the start of the module that triggers the
# warning (the -W option's is a literal name, so it could not cover instructune's submodules)
RUNNER = """
import sys, warnings
warnings.filterwarnings("error", category=FutureWarning)
warnings.filterwarnings("error", category=DeprecationWarning, module=r"instructune(\\.|$)")
from instructune.cli import main
sys.argv = ["instructune", *sys.argv[1:]]
main()
"""


def _run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    return subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_demo_pipeline_raises_no_deprecation_warning(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("classification", "summarization", "translation", "qa", "ner"), n_train=8,
                      lora={"target_modules": "all-linear"})
    config = write_config(tmp_path, cfg)
    done = _run("run", config)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Warning" not in done.stderr, done.stderr[-4000:]
    model = tmp_path / "run" / "model"
    done = _run("generate", "The app crashes when I log in.", "--model", model, "--task", "tiny_classification")
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr[-4000:]


def test_the_check_catches_a_future_warning_from_our_code(tmp_path):
    """The runner itself: a FutureWarning raised on the way (here from the CLI's entry) fails the command."""
    done = subprocess.run([sys.executable, "-c", RUNNER.replace(
        "from instructune.cli import main", "from instructune.cli import main\nwarnings.warn('old', FutureWarning)"),
        "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "FutureWarning: old" in done.stderr
