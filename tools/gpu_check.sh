#!/usr/bin/env bash
# The one prepared GPU check. Quick (default): at most 8 minutes on one H100/H200 including the kernel build,
# every step under its own timeout (the sum is the budget), results written as each step ends:
#   0. preflight (20 s): a GPU, a CUDA build of torch, ninja + nvcc (peft.kernels.preflight), pytest;
#   1. build and self-test the fused RLRR kernel (150 s; a first build takes about a minute);
#   2. the kernel tests on the device (60 s; skipped with one line when pytest is not installed);
#   3. a 100-step bf16 RLRR fine-tune of ViT-B/16 on random data, fused kernel asserted (100 s);
#   4. benchmark rows rlrr-kernel, rlrr (PyTorch path), lora, full at batch 64, one process each (150 s).
# --full adds the long table (every row, batch 64 and 256, compiled twins; about 15-20 minutes, beyond the budget).
# Usage: bash tools/gpu_check.sh [--full] [OUTPUT_DIR] (default runs/gpu_check). Exit 1 at the first failure.
set -uo pipefail
full=0
case "${1:-}" in
  -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;  # the comment above
  --full) full=1; shift ;;
  -*) echo "gpu_check.sh: unknown option $1 (usage: bash tools/gpu_check.sh [--full] [OUTPUT_DIR])" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, or torch is missing); nothing to check" >&2
  exit 1
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary="$out/summary.md"
echo "# gpu_check $(date -u +%FT%TZ)" > "$summary"

step() {  # step NAME SECONDS COMMAND...: run under a timeout, record the outcome, stop at a failure
  local name="$1" seconds="$2"; shift 2
  echo "== $name (timeout ${seconds}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "- $name: exit $rc in $((SECONDS - start)) s" | tee -a "$summary"
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "gpu_check: $name ran past its ${seconds}s budget" >&2
    exit 1
  fi
}

step 0-preflight 20 python - <<'PY'
import shutil, sys, torch
from peft.kernels import preflight
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)
problem = preflight.build_problem()
if problem:
    sys.exit(f"gpu_check: the fused kernel cannot be built: {problem}")
try:
    import pytest  # noqa: F401
except ImportError:
    print("note: pytest is not installed (pip install -e '.[test]'): step 2 is skipped")
PY

step 1-build 150 python -c "
from peft import kernels
kernels.load_extension()  # builds, then self-tests against the float64 specification
print(kernels.describe('cuda'))"

if python -c "import pytest" 2>/dev/null; then
  step 2-kernel-tests 60 python -m pytest -q -x tests/test_kernel.py -m gpu
else
  echo "- 2-kernel-tests: skipped (pytest not installed)" | tee -a "$summary"
fi

step 3-finetune 100 python - "$out" <<'PY'
import json, sys, time
import torch, torch.nn.functional as F
import vit, peft
from peft import kernels

torch.manual_seed(0)
model = vit.VisionTransformer(vit.get_config("ViT-B/16", num_classes=100)).cuda()
peft.apply_method(model, "rlrr")
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
for step in range(100):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(loss.detach())
torch.cuda.synchronize(); seconds = time.perf_counter() - t0
losses = [v.item() for v in losses]
path = kernels.describe("cuda")
result = {"path": path, "kernel_calls": calls, "first_loss": losses[0], "last_loss": losses[-1],
          "img_per_s": 100 * 64 / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
print(json.dumps(result, indent=2))
json.dump(result, open(f"{sys.argv[1]}/finetune.json", "w"), indent=2)
assert path.startswith("fused CUDA kernel"), path
assert calls["weight"] >= 100 * 72 and calls["grad"] >= 100 * 72, calls  # every adapted layer, every step
assert losses[-1] < losses[0], "the loss did not go down on a fixed batch"
PY

step 4-benchmark 150 python tools/benchmark.py --device cuda --model ViT-B/16 --batch-sizes 64 --repeats 3 \
    --modes rlrr-kernel rlrr lora full --peak-tflops 989 --output-dir "$out/benchmark"

if [ "$full" -eq 1 ]; then
  step 5-benchmark-full 1500 python tools/benchmark.py --device cuda --model ViT-B/16 --batch-sizes 64 256 \
      --repeats 5 --modes rlrr-kernel rlrr-kernel-keep rlrr-kernel-reuse rlrr rlrr-official lora full merged timm \
      --compile --compile-modes rlrr-kernel full --peak-tflops 989 --output-dir "$out/benchmark-full"
fi
echo "wrote $out (summary.md, finetune.json, benchmark/benchmark.md for the README)"
