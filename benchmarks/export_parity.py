"""Export parity on a real run: the GGUF export run by real llama.cpp (llama-cpp-python) against instructune's own
evaluation of the same fine-tuned model, on the run's test prompts.

For each GGUF type (f16, q8_0 by default; `--types f16 q8_0 q4_K_M q5_K_M q6_K` adds llama.cpp's K-quants): the prompts are rendered with the chat template read from the GGUF file itself
(`tokenizer.chat_template`, rendered like transformers does: a Jinja sandbox with trim_blocks/lstrip_blocks) from
the task's saved template, checked equal to the prompts evaluation used, and answered greedily by llama.cpp.
Printed per task: the share of greedy outputs identical to the evaluated model's, the primary metric of each and
the difference in points, and the generated tokens/s of llama.cpp against instructune's batched generation on the
same prompts (2-core CPU; llama.cpp answers one prompt at a time).

    make demo     # runs/demo
    .venv/bin/pip install llama-cpp-python   # builds llama.cpp (well over 10 minutes on 2 cores, cached after)
    .venv/bin/python benchmarks/export_parity.py --run runs/demo --limit 40
    .venv/bin/python benchmarks/export_parity.py --run runs/demo --limit 40 --types f16 q8_0 q4_K_M
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from instructune.config import load_config  # noqa: E402
from instructune.data import read_sources, split_sources  # noqa: E402
from instructune.evaluate.generate import generate  # noqa: E402
from instructune.export import export_gguf, llama_cpp_outputs, parity_report, test_prompts  # noqa: E402
from instructune.export.to_gguf import GGUF_TYPES  # noqa: E402
from instructune.export.source import full_precision_model, model_folder, tokenizer_and_format  # noqa: E402
from instructune.manifest import Manifest  # noqa: E402
from instructune.tasks import label_getter  # noqa: E402


def gguf_chat_template(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field else None


def render(chat_template: str, messages: list[dict]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template).render(messages=messages, add_generation_prompt=True)


def prompts_from_gguf(run: Path, gguf: Path, limit: int) -> tuple[dict[str, list[str]], float]:
    """The test prompts rendered with the GGUF's own chat template, and the share equal to evaluation's prompts."""
    cfg = load_config(run / "config.yaml")
    manifest = Manifest.read(model_folder(run))
    tasks = test_prompts(run, limit)
    template_text = gguf_chat_template(gguf)
    out, same, total = {}, 0, 0
    for tc in cfg.tasks:
        if tc.name not in tasks:
            continue
        t = tasks[tc.name]
        saved = t["template"]
        label_of = label_getter(saved) if tc.type == "classification" else None
        records = split_sources(read_sources(tc.data), tc.data, cfg.seed, label_of)["test"][:limit]
        messages = [saved.prompt_only(r) for r in records]
        if manifest.chat_template and template_text:
            out[tc.name] = [render(template_text, m) for m in messages]
        else:
            out[tc.name] = t["prompts"]
        same += sum(a == b for a, b in zip(out[tc.name], t["prompts"]))
        total += len(out[tc.name])
    return out, same / max(total, 1)


def instructune_speed(run: Path, limit: int) -> float:
    """Generated tokens/s of instructune's batched greedy generation (fp32) on the same test prompts."""
    model_dir = model_folder(run)
    manifest = Manifest.read(model_dir)
    model = full_precision_model(model_dir, manifest)
    tok, _ = tokenizer_and_format(model_dir, manifest)
    tokens, seconds = 0, 0.0
    for name, t in test_prompts(run, limit).items():
        fmt = manifest.prompt_format(tok, t["template"].separator)
        start = time.perf_counter()
        answers = generate(model, fmt, t["prompts"], t["template"].max_new_tokens, 32)
        seconds += time.perf_counter() - start
        tokens += sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--limit", type=int, default=40, help="test prompts per task")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=GGUF_TYPES,
                    help="GGUF types to export and compare (K-quants are made by llama.cpp's quantizer)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"# export parity, {datetime.date.today()}, run {args.run}, {args.limit} test prompts per task")
    ours = instructune_speed(args.run, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.types:
            gguf = export_gguf(args.run, Path(tmp) / f"model-{outtype}.gguf", outtype)
            prompts, same_prompt = prompts_from_gguf(args.run, gguf, args.limit)
            outputs, speed = llama_cpp_outputs(args.run, gguf, args.limit, args.threads, prompts=prompts)
            report = parity_report(args.run, outputs, args.limit)
            print(f"\n## {outtype} ({gguf.stat().st_size / 2**20:.0f} MiB): prompts from the GGUF's chat template equal "
                  f"evaluation's for {100 * same_prompt:.1f} %; llama.cpp {speed:.1f} generated tokens/s vs "
                  f"instructune {ours:.1f} (ratio {speed / ours:.2f})")
            print("| task | identical greedy outputs | metric | evaluated | llama.cpp | difference (points) |")
            print("| --- | --- | --- | --- | --- | --- |")
            for name, r in report.items():
                print(f"| {name} | {100 * r['share_identical']:.1f} % ({r['identical']}/{r['n']}) | {r['metric']} | "
                      f"{r['reference']:.4f} | {r['exported']:.4f} | {r['difference_points']:+.2f} |")


if __name__ == "__main__":
    main()
