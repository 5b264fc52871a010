#!/usr/bin/env bash
# bench/worker_gpu.py on a GPU machine that reaches no package registry (the device
# machine of this workplace): it has its own torch, transformers and huggingface_hub,
# and gets what it lacks (diffusers, torchao, pydantic and their pure-Python needs) as
# wheels carried in .whl/. Results and the log go to $OUT (else bench/gpu/).
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl diffusers==0.42.1 torchao==0.18.0 pydantic pydantic-core annotated-types \
#       typing-inspection importlib-metadata      # the versions of requirements.lock
#   bench/gpu/run.sh [--deadline-seconds 480] [worker_gpu.py options]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-bench/gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 bench/worker_gpu.py --json "$out/worker_gpu.json" "$@" 2>&1 | grep -v "Enum subclass\|register_constant\|_pytree.py" | tee "$out/worker_gpu.log"
