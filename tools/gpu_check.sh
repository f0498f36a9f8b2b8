#!/usr/bin/env bash
# One prepared GPU check (about 6-8 minutes on one H100/H200), in this order:
#   1. the GPU kernel tests (kernel vs PyTorch specification on the device) and the host-built kernel tests;
#   2. a 200-step bf16 RLRR fine-tune of ViT-B/16 on random data that asserts the fused kernel was taken;
#   3. the benchmark table (rlrr-kernel and its keep/reuse W' options, rlrr torch path, rlrr-official, lora,
#      full, merged, timm if installed;
#      batch 64 and 256; compiled twins of rlrr-kernel and full) with CUDA-event timing, peak memory and
#      achieved TFLOP/s against the FLOP model; JSON, PNG and the markdown table the README shows.
# Usage: bash tools/gpu_check.sh [OUTPUT_DIR] (default runs/gpu_check). Exits non-zero at the first failure.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_check.sh: unknown option $1 (usage: bash tools/gpu_check.sh [OUTPUT_DIR])" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    | tee "$out/device.txt"

echo "== 1. kernel tests"
python -m pytest -q tests/test_kernel.py tests/test_kernel_host.py 2>&1 | tee "$out/kernel_tests.txt"

echo "== 2. 200-step bf16 RLRR fine-tune of ViT-B/16, fused kernel asserted"
python - "$out" <<'PY' 2>&1 | tee "$out/finetune_200.txt"
import json, sys, time
import torch, torch.nn.functional as F
import vit, peft
from peft import kernels

torch.manual_seed(0)
model = vit.VisionTransformer(vit.get_config("ViT-B/16", num_classes=100)).cuda()
peft.apply_mode(model, "rlrr")
kernels.set_backend("cuda")  # the kernel or an error, never a silent fallback
calls = {"weight": 0, "grad": 0}
real_w, real_g = kernels.rlrr_weight, kernels.rlrr_grad_scales
kernels.rlrr_weight = lambda *a: (calls.__setitem__("weight", calls["weight"] + 1), real_w(*a))[1]
kernels.rlrr_grad_scales = lambda *a: (calls.__setitem__("grad", calls["grad"] + 1), real_g(*a))[1]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
x = torch.randn(64, 3, 224, 224, device="cuda")
y = torch.randint(0, 100, (64,), device="cuda")
losses = []
torch.cuda.synchronize(); t0 = time.perf_counter()
for step in range(200):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
torch.cuda.synchronize(); seconds = time.perf_counter() - t0
path = kernels.describe("cuda")
result = {"path": path, "kernel_calls": calls, "first_loss": losses[0], "last_loss": losses[-1],
          "img_per_s": 200 * 64 / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
print(json.dumps(result, indent=2))
json.dump(result, open(f"{sys.argv[1]}/finetune_200.json", "w"), indent=2)
assert path.startswith("fused CUDA kernel"), path
assert calls["weight"] >= 200 * 72 and calls["grad"] >= 200 * 72, calls  # every adapted layer, every step
assert losses[-1] < losses[0], "the loss did not go down on a fixed batch"
PY

echo "== 3. benchmark"
python tools/benchmark.py --device cuda --model ViT-B/16 --batch-sizes 64 256 --repeats 5 \
    --modes rlrr-kernel rlrr-kernel-keep rlrr-kernel-reuse rlrr rlrr-official lora full merged timm \
    --compile --compile-modes rlrr-kernel full \
    --peak-tflops 989 --output-dir "$out/benchmark" 2>&1 | tee "$out/benchmark.txt"
echo "wrote $out (benchmark.json, benchmark.png, benchmark.md for the README)"
