#!/usr/bin/env bash
# One prepared run on the lent GPU machine (see README "GPU checks"): mixed precision + step speed.
# Expects wheels for transformers 5.x / huggingface_hub 2.x in .whl/ and the model in .devdata/.
set -u
if ! python3 -c "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
MODEL=.devdata/mobilenet_v2_1.0_224-imagenet
python3 benchmarks/mixed_precision_check.py --model "$MODEL" --steps 8 2>&1 | grep -E "device|  (fp|bf)|RESULT|Error|error" | tee "$OUT/mixed_precision.txt"
HF_FREEZE_SHARED=.devdata-shared python3 - <<'PY'
import os; os.makedirs(".devdata-shared/models", exist_ok=True)
p = ".devdata-shared/models/mobilenet_v2_1.0_224-imagenet"
os.path.exists(p) or os.symlink(os.path.abspath(".devdata/mobilenet_v2_1.0_224-imagenet"), p)
PY
HF_FREEZE_SHARED=.devdata-shared python3 benchmarks/step_speed.py --rounds 2 --steps 40 2>&1 | grep -A9 "^MobileNetV2" | tee "$OUT/step_speed_cuda.txt"
HF_FREEZE_SHARED=.devdata-shared CUDA_VISIBLE_DEVICES="" python3 benchmarks/step_speed.py --rounds 2 --steps 30 2>&1 | grep -A9 "^MobileNetV2" | tee "$OUT/step_speed_cpu16.txt"
