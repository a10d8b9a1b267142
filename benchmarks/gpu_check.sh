#!/usr/bin/env bash
# The GPU check of issue 24: LoRA vs QLoRA vs + activation checkpointing on random-init weights of real shapes
# (SmolLM2-1.7B, Llama-3.1-8B), bf16, instructune's memory plan against torch.cuda.max_memory_allocated, tokens/s
# against TRL's SFTTrainer in the same run. One table, within 8 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu_check.sh --vendor       # once, on a machine WITH network: fills benchmarks/.gpu_vendor/
#   bash benchmarks/gpu_check.sh                # on the GPU machine (no network; torch, transformers, peft, accelerate)
#   bash benchmarks/gpu_check.sh --cpu-smoke    # the same logic on a CPU with a tiny shape (seconds)
#
# Everything else the run needs travels in the git-ignored benchmarks/.gpu_vendor/ (well under 64 MiB):
# bitsandbytes with only its CUDA 13.0 (and CPU) library, TRL (pure Python), instructune's missing dependencies
# (pydantic and pydantic-core, for CPython 3.10-3.14). The run appends that folder to sys.path, after the machine's
# own packages (a package the machine has wins), and puts src/ first. Options after the first are passed to
# benchmarks/gpu_check.py (`--help` lists them). PYTHON picks the interpreter (default: python3, or python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENDOR="$ROOT/benchmarks/.gpu_vendor"
LIMIT_S=${GPU_CHECK_LIMIT_S:-470}   # a hard stop under 8 minutes; the script itself stops starting rows earlier

# Pinned to the versions instructune is tested with here (bitsandbytes' wheel holds every CUDA library: ~125 MB;
# only the one for torch's CUDA 13.0 build and the CPU one, for --cpu-smoke, are kept).
PURE=("trl==1.16.0" "pydantic==2.14.4" "annotated-types==0.8.0" "typing-inspection==0.4.5")
BINARY=("bitsandbytes==0.50.2")
PER_PYTHON=("pydantic-core==2.50.5")   # compiled per CPython version: one library per version, side by side
PYTHONS=(3.10 3.11 3.12 3.13 3.14)
KEEP_LIBS=(libbitsandbytes_cuda130.so libbitsandbytes_cpu.so)

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  for p in python3 python; do command -v "$p" >/dev/null && { echo "$p"; return; }; done
  echo "gpu_check: no python3 or python on PATH (set PYTHON=...)" >&2; exit 2
}

vendor() {
  local pip tmp whl
  if [[ -x "$ROOT/.venv/bin/python" ]]; then pip=("$ROOT/.venv/bin/python" -m pip); else pip=("$(pick_python)" -m pip); fi
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' RETURN
  local platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
                  --platform manylinux2014_x86_64 --only-binary=:all: --no-deps --implementation cp)
  "${pip[@]}" download -q --no-deps --only-binary=:all: -d "$tmp/pure" "${PURE[@]}"
  "${pip[@]}" download -q "${platform[@]}" --python-version 3.11 -d "$tmp/bin" "${BINARY[@]}"
  for v in "${PYTHONS[@]}"; do
    "${pip[@]}" download -q "${platform[@]}" --python-version "$v" -d "$tmp/py$v" "${PER_PYTHON[@]}" \
      || echo "gpu_check --vendor: no ${PER_PYTHON[*]} wheel for CPython $v (skipped)" >&2
  done
  rm -rf "$VENDOR.new" && mkdir -p "$VENDOR.new"
  for whl in "$tmp"/*/*.whl; do
    "${pip[0]}" -m zipfile -e "$whl" "$VENDOR.new"   # wheels are zip files; the same package unpacks over itself
  done
  for lib in "$VENDOR.new"/bitsandbytes/libbitsandbytes_*; do
    [[ " ${KEEP_LIBS[*]} " == *" $(basename "$lib") "* ]] || rm -f "$lib"
  done
  find "$VENDOR.new" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$VENDOR" && mv "$VENDOR.new" "$VENDOR"
  echo "gpu_check --vendor: $(du -sh "$VENDOR" | cut -f1) in $VENDOR ($(ls "$VENDOR" | grep -vc dist-info) packages;" \
       "pydantic-core for CPython $(ls "$VENDOR"/pydantic_core/_pydantic_core.cpython-* | sed -E 's/.*cpython-3([0-9]+).*/3.\1/' | tr '\n' ' ' | sed 's/ $//'))"
}

if [[ "${1:-}" == "--vendor" ]]; then
  vendor
  exit 0
fi

PY="$(pick_python)"
if [[ ! -d "$VENDOR" ]]; then
  echo "gpu_check: $VENDOR is missing: run 'bash benchmarks/gpu_check.sh --vendor' on a machine with network first" \
       "(and carry that folder with the repository)" >&2
  exit 2
fi
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_DISABLE_TELEMETRY=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0
timeout --signal=INT --kill-after=10 "$LIMIT_S" $PY "$ROOT/benchmarks/gpu_check.py" --vendor-dir "$VENDOR" "$@" || status=$?
if [[ $status -eq 124 || $status -eq 130 ]]; then
  echo "gpu_check: stopped at the ${LIMIT_S} s limit (the rows printed above are complete; later ones were not run)" >&2
fi
exit $status
