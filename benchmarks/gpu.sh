#!/usr/bin/env bash
# The GPU figures of the README, on one NVIDIA GPU host, in one run: writes benchmarks/gpu_<device>.json.
#
#   bash benchmarks/gpu.sh            # from the repository root; ~10-15 minutes on an H100 (most of it installing)
#
# 1. installs this package with the cuda12 extra (jax[cuda12], cuDNN included) into .venv-gpu; PyTorch's CUDA build
# 2. ViT-B/16 bf16 training at batch 256: images/s, MFU (model FLOPs / the GPU's dense bf16 peak), which attention ran
# 3. ViT-L/16 bf16 at batch 128 with scan + remat: does it fit (XLA's memory plan, then the real step)
# 4. PyTorch on the same GPU beside each (Hugging Face ViT, SDPA attention, bf16 autocast, AdamW)
# 5. the test suite's GPU-relevant tests (attention paths, sharding, a train step), on the GPU
# It has not run: no GPU has been available to this project (docs/accelerators.md says what was compiled for one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
PY=$VENV/bin/python
OUT=${OUT:-benchmarks/gpu_results}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch  # PyPI's default Linux wheel is the CUDA build
  "$PY" -m pip install -q -e ".[cuda12,test]" torch
fi
"$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"

# Which attention the model's 'auto' runs here, and whether cuDNN's fused attention is in the compiled step.
"$PY" - > "$OUT/attention.json" <<'EOF'
import json, jax, jax.numpy as jnp
from vit_jax import hardware, models
from vit_jax.models import encoder
platform = hardware.host_platform()  # what vit_jax.main's mesh over this GPU gives the model
model = models.create_model('vit_b16', num_classes=1000, dtype='bfloat16', platform=platform)
x = jnp.zeros((8, 224, 224, 3), jnp.bfloat16)  # 197 tokens: cuDNN's backward takes them padded to 200
params = jax.eval_shape(model.init, jax.random.key(0), x)
loss = lambda p: model.apply(p, x).astype(jnp.float32).sum()
params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
print(json.dumps({'device': jax.devices()[0].device_kind, 'platform': platform,
                  'attention_auto_resolves_to': encoder.resolve_attention('auto', jnp.bfloat16, 64,
                                                                          platform=platform),
                  'cudnn_fmha_calls_in_compiled_step': hlo.count('__cudnn$fmha')}))
EOF
cat "$OUT/attention.json"

bench() {  # NAME ARGS...: one vit_jax.bench run, its JSON kept
  local name=$1; shift
  "$PY" -m vit_jax.bench --dtype bfloat16 --json "$OUT/$name.json" "$@" | tail -n 30 || echo "{\"failed\": \"$name\"}" > "$OUT/$name.json"
}
bench vit_b16_b256_train --model vit_b16 --batch 256 --mode train --compare torch --torch-model huggingface --steps 20 --warmup 5
bench vit_b16_b256_train_xla_attention --model vit_b16 --batch 256 --mode train --override attention_impl=xla --steps 20 --warmup 5
bench vit_l16_b128_scan_remat_compile --model vit_l16 --batch 128 --mode compile --override scan_layers=True --override remat=True
bench vit_l16_b128_scan_remat_train --model vit_l16 --batch 128 --mode train --override scan_layers=True --override remat=True --compare torch --torch-model huggingface --steps 10 --warmup 3

# GPU-relevant tests: which attention runs, cuDNN against XLA on this GPU, the models forward and backward.
"$PY" -m pytest -q tests/test_cpu_attention.py tests/test_models.py tests/test_param_counts.py \
  -k "impl or cudnn or auto or accelerator or param" 2>&1 | tail -n 15 | tee "$OUT/tests.txt" || true

# One JSON: every part, and the MFU against the GPU's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s).
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob('*.json')) if p.stem != 'gpu'}
device = parts['attention']['device']
peaks = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12}
peak = next((v for k, v in peaks.items() if k in device), None)
for name, r in parts.items():
    if peak and r.get('train_images_per_s') and r.get('train_flops_per_image'):
        r['mfu_vs_dense_bf16_peak'] = r['train_images_per_s'] * r['train_flops_per_image'] / peak
parts['tests'] = (out / 'tests.txt').read_text().strip().splitlines()[-1:] if (out / 'tests.txt').exists() else []
slug = device.replace(' ', '_')
result = pathlib.Path('benchmarks') / f'gpu_{slug}.json'
result.write_text(json.dumps({'device': device, 'dense_bf16_peak_flops_per_s': peak, **parts}, indent=1))
print(result)
EOF
