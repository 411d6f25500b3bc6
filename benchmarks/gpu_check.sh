#!/usr/bin/env bash
# The project's GPU checks, one short script for a machine with one CUDA GPU (run from the
# repository root). Needs python3 with torch, numpy, pyarrow and pyyaml; no Ray or MLflow
# (except section 5: Ray, Pillow, and torchvision for the detector).
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== 1. fast scorer vs literal on CUDA (float32, padding, masks) =="
$py - <<'PY'
import sys, warnings, torch
sys.path.insert(0, ".")
from shan.config import ModelConfig
from shan.model import SHAN
from shan.reference import score_literal
warnings.simplefilter("ignore")
torch.manual_seed(0)
dev = torch.device("cuda")
m = SHAN(ModelConfig(d=256, d_a=64, feature_dim=128), 500).to(dev).eval()
f = torch.randn(6, 12, 128, device=dev); counts = torch.tensor([12, 5, 9, 12, 1, 7], device=dev)
lens = torch.tensor([9, 3, 14, 1, 6, 11, 2]); tok = torch.randint(4, 500, (7, 14), device=dev)
with torch.no_grad():
    im, cap = m.encode_images(f, counts), m.encode_captions(tok, lens.to(dev))
    fast, lit = m.score(im, cap, block=4), score_literal(m, im, cap)
    diff = max((fast[k] - lit[k]).abs().max().item() for k in fast)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf = m.score(m.encode_images(f, counts), m.encode_captions(tok, lens.to(dev)))
print(f"max |fast - literal| on CUDA float32: {diff:.2e} (limit 1e-4): {'OK' if diff <= 1e-4 else 'FAIL'}")
print(f"bf16 autocast: finite {all(torch.isfinite(v).all().item() for v in bf.values())}, "
      f"max |bf16 - fp32| {max((bf[k].float() - fast[k]).abs().max().item() for k in fast):.3f}")
PY

echo "== 2. scoring benchmark at the paper's sizes =="
$py benchmarks/scoring.py --device cuda --images 256 --captions 256 --literal-pairs 64

echo "== 3. training step at the f30k config's sizes (batch 128, d 1024, bf16) =="
$py benchmarks/train_gpu.py --steps 10 || echo "training benchmark failed"
$py benchmarks/train_gpu.py --steps 10 scaling.checkpoint_blocks=true || echo "failed"

echo "== 4. evaluation: a slice of a COCO-5K-sized matrix =="
$py benchmarks/eval_gpu.py --images 500 --captions 5000 --blocks 64 128

echo "== 5. image features: images/s per GPU for each extractor (detector needs torchvision) =="
$py benchmarks/extract.py --images 256 --size 448 --batch 16 --arch resnet152 --extractors grid detector || echo "extraction benchmark failed"
$py -m pytest tests/test_features.py -q -k detector -rs || echo "detector tests failed"
