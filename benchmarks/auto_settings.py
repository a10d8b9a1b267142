"""`train.epochs: auto` / `train.lr: auto` against a config's hand-picked settings, on the test split.

Trains and evaluates the config with `epochs: auto` and `lr: auto` (no baselines: only the fine-tuned model is
compared) into `runs/<name>-auto`, unless that folder already holds a finished evaluation, then compares it with
another evaluation of the same test split, by default the config's own settings as the sweep's trial 0 evaluated them
(`runs/<name>-sweep`, or its `sweep/default` when the sweep chose other settings). Printed per task: the primary
metric of each, the change in points with its paired-bootstrap 95 % interval (the report's statistics), and the
optimizer steps each took.

    .venv/bin/instructune sweep configs/uci-sentiment.yaml --budget 45m --set output_dir=runs/uci-sentiment-sweep
    .venv/bin/python benchmarks/auto_settings.py configs/uci-sentiment.yaml --against runs/uci-sentiment-sweep
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from instructune import tasktypes  # noqa: E402
from instructune.config import load_config  # noqa: E402
from instructune.evaluate.stats import compare  # noqa: E402
from instructune.io import read_json, read_jsonl  # noqa: E402

AUTO = ["--set", "train.epochs=auto", "--set", "train.lr=auto", "--set", "baseline.enabled=false"]


def evaluation_of(folder: Path) -> Path:
    """The folder whose finetuned.json evaluates the config's own settings: a sweep's default when it was not chosen."""
    record = read_json(folder / "sweep" / "sweep.json")
    if record and record["chosen"] != record["default"]:
        return folder / "sweep" / "default"
    return folder


def steps(folder: Path) -> int | None:
    log = folder / "train_log.jsonl"
    rows = [r for r in read_jsonl(log) if "step" in r] if log.exists() else []
    return rows[-1]["step"] if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--against", type=Path, required=True, help="a run folder (or a sweep's run folder) evaluated "
                    "with the config's own settings on the same test split")
    ap.add_argument("--out", type=Path, help="the auto run's folder (default runs/<name>-auto)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    out = args.out or ROOT / "runs" / f"{cfg.name}-auto"
    if not (out / "finetuned.json").exists():
        exe = str(Path(sys.executable).with_name("instructune"))
        for stage in ("train", "evaluate"):
            subprocess.run([exe, stage, str(args.config), *AUTO, "--set", f"output_dir={out}"], check=True)
    own_dir = evaluation_of(args.against)
    own, auto = read_json(own_dir / "finetuned.json"), read_json(out / "finetuned.json")
    print(f"{cfg.name}: auto ({out}) against the config's own settings ({own_dir}), same test split")
    print(f"steps: auto {steps(out)}, own {steps(own_dir)}")
    for task in cfg.tasks:
        a, o = auto[task.name]["finetuned"], own[task.name]["finetuned"]
        assert [p["reference"] for p in a["predictions"]] == [p["reference"] for p in o["predictions"]], \
            "the two evaluations are not of the same test items"
        metric = tasktypes.get(task.type).primary_metric
        ci = compare(task.type, [p["prediction"] for p in o["predictions"]], [p["prediction"] for p in a["predictions"]],
                     [p["reference"] for p in a["predictions"]], task.choices, 2000, cfg.seed, 0.95)[metric]
        print(f"  {task.name}: {metric} auto {a['metrics'][metric]:.4f}, own {o['metrics'][metric]:.4f}; "
              f"auto - own {100 * (a['metrics'][metric] - o['metrics'][metric]):+.1f} points "
              f"[{100 * ci['ci_low']:+.1f}, {100 * ci['ci_high']:+.1f}] (n {len(a['predictions'])})")


if __name__ == "__main__":
    main()
