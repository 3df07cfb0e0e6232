"""SPINEPS phase 2: the instance network (residual 3D U-Net) on body-centred cutouts (arXiv 2402.16368).

  python -m spine_jax.train --config=configs/instance.py --workdir=runs/instance

Variants (after the colon, combined with commas):
  ''        default: trains on a 2-core CPU in minutes. The semantic mask goes to a coarse grid
            (2.25 x 2.25 x 3.3 mm, 3 x 3 x 2 reference voxels), cutouts of 72 x 80 x 16 voxels
            (162 x 180 x 53 mm: the body with its posterior elements and a vertebra above and
            below), and SPINEPS 2.x's width (dim 8: 8, 8, 16, 32, 64).
  'spineps' SPINEPS 1.x scale (the model of `conversion.spineps.spineps_instance_config`): the reference spacing,
            248 x 304 x 64 cutouts, widths 16..128 (5.4 M parameters), Adam 1e-4 decaying to 1%
            as the authors; for GPUs/TPUs.
  'bf16'    bfloat16 compute (parameters stay float32).
  'gpu'     one 80 GB accelerator: the 'spineps' scale (248 x 304 x 64 cutouts, widths 16..128), bf16, batch 8.
  'smoke'   a tiny network, tiny volumes and a few steps, for tests and launch checks.
"""
import ml_collections

from spine_jax.config_variants import parse_variants
from spine_jax.conversion import spineps
from spine_jax.data.phantoms import mri as mri_phantoms
from spine_jax.models import instance_unet


def spineps_scale() -> ml_collections.ConfigDict:
  """SPINEPS' instance model (as converted bundles describe it) with its authors' training values."""
  c = spineps.spineps_instance_config()
  c.seed = 0
  c.model.remat = True
  # Volumes as the semantic task reads them (phantoms or a manifest with an instance column).
  c.data.source = "phantom"          # 'phantom' | 'manifest'
  c.data.manifest = ""               # CSV / JSON lines: image, semantic, instance[, split]
  c.data.test_manifest = ""
  c.data.phantom = mri_phantoms.default_mri_phantom_config()
  c.data.phantom.num_test_volumes = 24  # "every vertebra found" is a per-volume rate: 8 is too coarse
  c.data.phantom.shape = (0, 0, 0)   # fit every axis to the anatomy: a full-width field
  c.data.num_workers = 0             # grain worker processes for cutout sampling
  c.data.prep_workers = 2            # processes preparing volumes at start-up
  c.batch_size = 4
  c.num_train_steps = 50_000
  # The authors' Adam 1e-4 with linear decay to 1% (poly 0.9 is the nearest schedule here) and an
  # L2 penalty on the weights (coupled weight decay here).
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, warmup_steps=0,
      schedule="poly", end_learning_rate_factor=0.01, grad_clip_norm=0.0))
  # SPINEPS: cross-entropy + soft Dice over the foreground classes, Dice per sample.
  c.loss = ml_collections.ConfigDict(dict(batch_dice=False))
  c.log_every = 100
  c.eval_every = 5000                # held-out Dice during training (0: only at the end)
  c.checkpoint_every = 2000
  c.keep_checkpoints = 2
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = parse_variants(arg, ("spineps", "bf16", "gpu", "smoke"), "configs/instance.py")

  c = spineps_scale()
  if "spineps" not in variants and "gpu" not in variants:
    c.model.dim = 8
    c.model.remat = False
    c.data.phantom.shape = mri_phantoms.default_mri_phantom_config().shape
    c.data.preprocess.spacing = (2.25, 2.25, 3.3)  # mm (P, I, R); reference 0.75, 0.75, 1.65
    c.data.cutout.cutout_size = (72, 80, 16)
    c.batch_size = 2
    # 300 steps: 17.7 min in all on 2 shared CPU cores, mean vertebra Dice 0.962 after phase 2 on the
    # 8 held-out phantoms (400 steps: 26.7 min, 0.989).
    c.num_train_steps = 300
    c.optimizer.update(name="adamw", learning_rate=2e-3, warmup_steps=20, schedule="cosine", grad_clip_norm=5.0)
    # Voxel thresholds of phase 2 are at the reference spacing and scaled, but the body erosion is in
    # voxels: 1 on the coarse grid.
    c.inference.body_erosion = 1
    c.log_every = 20
    c.eval_every = 0
    c.checkpoint_every = 100
  if "bf16" in variants or "gpu" in variants:
    c.model.dtype = "bfloat16"
  if "gpu" in variants:
    # Training activations in bf16 at the full-resolution level (16 channels, two residual blocks in the encoder
    # and two in the decoder, each keeping ~4 tensors, plus the 7^3 stem and the skip concatenations): ~0.6 KB per
    # voxel, ~0.8 KB with the lower levels (8x fewer voxels, 2x the channels each); 248 x 304 x 64 = 4.8 M voxels,
    # ~4 GB per cutout. Batch 8: ~32 GB (remat stays on), the rest for XLA's temporaries and the one-hot inputs.
    c.batch_size = 8
  if "smoke" in variants:
    c.model = instance_unet.tiny_instance_unet_config()
    c.data.preprocess.spacing = (3.0, 3.0, 3.3)
    c.data.phantom = mri_phantoms.smoke_config()
    c.data.cutout.cutout_size = (24, 32, 16)
    c.data.prep_workers = 1
    c.inference.body_erosion = 0
    c.batch_size = 4
    c.num_train_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
  return c
