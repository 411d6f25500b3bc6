#!/usr/bin/env bash
# The project's GPU checks, one short script for a machine with one CUDA GPU (run from the
# repository root). Needs python3 with torch, numpy, pyarrow and pyyaml; no Ray or MLflow
# (except section 5: Ray, Pillow, and torchvision for the detector; section 6 imports the
# training worker's code, which needs pyarrow but starts no Ray).
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's shan, installed or not
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== 1. fast scorer vs literal on CUDA (float32, padding, masks) =="
$py - <<'PY'
import warnings, torch
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
$py -m pytest tests/unit/test_features_detector.py -q -rs -p no:cacheprovider || echo "detector tests failed"

echo "== 6. the library's seams on CUDA: golden training steps, checkpoint loaders, scoring =="
CUBLAS_WORKSPACE_CONFIG=:4096:8 $py - <<'PY'
import json, sys, tempfile, warnings
import numpy as np, torch
sys.path.insert(0, "tests/unit")
warnings.simplefilter("ignore")
from test_train_golden import GOLDEN, compute_losses, golden_config, WORDS
from shan.checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint
from shan.model import SHAN
from shan.scoring import score_matrix
from shan.vocab import Vocabulary
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
want = json.loads(GOLDEN.read_text())["losses"]
def worst(got):
    return max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(got, want))
cfg = golden_config(); cfg.scaling.bf16 = False
fp32 = compute_losses(cfg, device="cuda")
print(f"20 golden steps, CUDA float32: max relative difference to the CPU record {worst(fp32):.1e}"
      f" (limit 1e-3): {'OK' if worst(fp32) <= 1e-3 else 'FAIL'}")
cfg = golden_config(); cfg.scaling.bf16 = True
bf = compute_losses(cfg, device="cuda")
print(f"20 golden steps, CUDA bf16 autocast: finite {bool(np.isfinite(bf).all())}, "
      f"max relative difference {worst(bf):.1e}")
cfg, vocab = golden_config(), Vocabulary(WORDS)
torch.manual_seed(0)
model = SHAN(cfg.model, len(vocab))
opt = torch.optim.Adam(model.parameters())
with tempfile.TemporaryDirectory() as d:
    save_checkpoint(d, Checkpoint(model.state_dict(), cfg, vocab, optimizer=opt.state_dict(), epoch=2))
    full = load_checkpoint(d)
    gpu = load_model(d, "cuda")
    cpu = load_model(d, "cpu")
print(f"loaders: training keeps the optimizer {full.optimizer is not None}, epoch {full.epoch}; "
      f"scoring model on {next(gpu.model.parameters()).device}")
rng = np.random.default_rng(0)
feats = rng.normal(size=(40, 5, cfg.model.feature_dim)).astype(np.float32)
counts = rng.integers(1, 6, size=40)
toks = [rng.integers(4, len(vocab), size=int(rng.integers(3, 12))).tolist() for _ in range(200)]
a = score_matrix(cpu.model, feats, counts, toks, torch.device("cpu"), image_chunk=16, caption_chunk=64)
b = score_matrix(gpu.model, feats, counts, toks, torch.device("cuda"), image_chunk=16,
                 caption_chunk=64, bf16=False)
diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
print(f"whole-split scoring, CUDA float32 vs CPU: max |difference| {diff:.1e} (limit 1e-4): "
      f"{'OK' if diff <= 1e-4 else 'FAIL'}")
PY
