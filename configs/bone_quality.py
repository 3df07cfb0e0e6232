"""Bone-quality multi-task classifier on axial CT slices (arXiv 2402.08910).

  python -m spine_jax.train --config=configs/bone_quality.py --workdir=runs/bone_quality
  python -m spine_jax.train --config=configs/bone_quality.py:baseline --workdir=runs/baseline

Variants (the text after the colon):
  ''          default: a small DenseNet on 64x64 phantom slices, trains on a 2-core CPU in minutes.
  'baseline'  the paper's baseline: the same trunk classifying the 4 bone-quality classes directly.
  'soft'      soft parameter sharing: one trunk per task coupled by cross-stitch units.
  'paper'     DenseNet-121 at 224x224 with the authors' optimiser settings (GPU/TPU scale).
  'gpu'       one 80 GB accelerator: the 'paper' model and slices (DenseNet-121, 224 x 224, 3 channels), bf16,
              batch 512.
  'smoke'     a tiny model and a few steps, for tests and launch checks.
Variants combine with commas, e.g. 'baseline,smoke'.
"""
import ml_collections

from spine_jax.config_variants import parse_variants
from spine_jax.data.phantoms import ct as ct_phantoms
from spine_jax.models import multitask
from spine_jax.training import self_paced


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = parse_variants(arg, ("baseline", "soft", "paper", "gpu", "smoke", "posterolateral"), "configs/bone_quality.py")

  c = ml_collections.ConfigDict()
  c.task = "bone_quality"
  c.seed = 0

  c.model = multitask.default_model_config()
  c.model.kind = "hard"
  c.model.trunk = "small"
  c.model.init_from = ""             # trunk weights: torchvision/MONAI DenseNet .pth or `convert densenet` .npz

  c.data = ml_collections.ConfigDict()
  c.data.source = "phantom"          # 'phantom' | 'manifest'
  c.data.manifest = ""               # CSV / JSON-lines of CT vertebrae (source='manifest')
  c.data.test_manifest = ""          # held-out manifest; empty: rows with split=test of `manifest`
  c.data.phantom = ct_phantoms.default_phantom_config()
  c.data.slices = c.data.phantom.slices
  c.data.in_channels = 1             # 3 replicates the grey slice for ImageNet weights
  c.data.num_workers = 0             # grain worker processes (0: in the main process)
  c.data.normal_fraction = 0.5       # repeat abnormal slices until normals are this share (0: as drawn)
  c.data.augment = ml_collections.ConfigDict(dict(
      flip_lr=True, flip_ap=True, max_rotation_deg=30.0, intensity_scale=0.1, intensity_shift=0.1, noise_std=0.05))

  c.batch_size = 64                  # global, over all devices and processes
  c.num_train_steps = 1000
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-3, weight_decay=1e-5, b1=0.9, b2=0.999,
      warmup_steps=100, schedule="cosine", end_learning_rate_factor=0.01, grad_clip_norm=5.0))
  c.loss = ml_collections.ConfigDict(dict(
      smoothing=0.1,
      task_weights=dict(blastic=1.0, lytic=1.0, quality=1.0, posterolateral=1.0)))
  c.self_paced = self_paced.default_self_paced_config()
  c.self_paced.start_step = 300

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256, normal_fraction=0.7, dominant_share=0.7, posterolateral_min_fraction=0.2))
  c.log_every = 50
  c.eval_every = 0                   # 0: evaluate only at the end
  c.checkpoint_every = 200
  c.keep_checkpoints = 2

  if "baseline" in variants:
    c.model.kind = "single_quality"
  if "posterolateral" in variants:
    c.model.kind = "single_posterolateral"
  if "soft" in variants:
    c.model.kind = "soft"
  if "paper" in variants or "gpu" in variants:
    c.model.trunk = "densenet121"
    c.data.slices.image_size = 224
    c.data.in_channels = 3
    c.batch_size = 32
    c.num_train_steps = 30000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.name = "adam"
    c.optimizer.warmup_steps = 1000
    c.self_paced.start_step = 500
    c.data.phantom.num_train_vertebrae = 2000  # about 25,000 slices: 5 GB of float32 at 224 px
    c.checkpoint_every = 1000
    c.log_every = 100
  if "gpu" in variants:
    # DenseNet-121's training activations at 224 x 224: the stem (64 channels at 112^2) and the first dense block's
    # concatenations (up to 256 channels at 56^2) dominate, ~70 MB per slice in bf16 with the later blocks. Batch
    # 512: ~36 GB, the rest for XLA's temporaries (BatchNorm statistics in float32) and the optimiser state.
    c.model.dtype = "bfloat16"
    c.batch_size = 512
  if "smoke" in variants:
    c.model.trunk = "tiny"
    c.data.slices.image_size = 32
    c.data.phantom.num_train_vertebrae = 24
    c.data.phantom.num_test_vertebrae = 12
    c.batch_size = 8
    c.num_train_steps = 6
    c.optimizer.warmup_steps = 2
    c.self_paced.start_step = 2
    c.self_paced.ramp_steps = 4
    c.log_every = 2
    c.checkpoint_every = 3
    c.eval.batch_size = 32
  return c
