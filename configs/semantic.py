"""SPINEPS phase 1: the semantic 3D U-Net on sagittal T2w MRI (arXiv 2402.16368).

  python -m spine_jax.train --config=configs/semantic.py --workdir=runs/semantic

Variants (after the colon, combined with commas):
  ''        default: a narrow U-Net on phantom spines, at 1.5 mm along P (0.75 mm along I, where the
            1 mm endplates and the discs stack), that trains on a 2-core CPU in about 18 minutes
            (1,100 steps; BUILD_NOTES.md has its held-out Dice).
  'nnunet'  nnU-Net 3d_fullres scale: 6 stages 32..320, SGD Nesterov 0.99 with poly decay, 1000 epochs'
            worth of steps; for GPUs/TPUs.
  'bf16'    bfloat16 compute (parameters stay float32).
  'gpu'     one 80 GB accelerator: the 'nnunet' plan and patch (128 x 192 x 64), bf16, batch 16.
  'smoke'   a tiny U-Net, tiny volumes and a few steps, for tests and launch checks.
"""
import ml_collections

from spine_jax.config_variants import parse_variants
from spine_jax.data import patches
from spine_jax.data import spatial
from spine_jax.data.phantoms import mri as mri_phantoms
from spine_jax.models import unet


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = parse_variants(arg, ("nnunet", "bf16", "gpu", "smoke"), "configs/semantic.py")

  c = ml_collections.ConfigDict()
  c.task = "semantic"
  c.seed = 0

  c.model = unet.default_unet_config()
  c.model.n_stages = 5
  c.model.features_per_stage = (8, 16, 32, 64, 128)
  c.model.kernel_sizes = ((3, 3, 3),) * 5
  c.model.strides = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1))
  c.model.n_conv_per_stage = (2,) * 5
  c.model.n_conv_per_stage_decoder = (2,) * 4

  c.data = ml_collections.ConfigDict()
  c.data.source = "phantom"          # 'phantom' | 'manifest'
  c.data.manifest = ""               # CSV / JSON lines: image, semantic[, instance][, split]
  c.data.test_manifest = ""
  c.data.phantom = mri_phantoms.default_mri_phantom_config()
  c.data.preprocess = ml_collections.ConfigDict(dict(
      axcodes=spatial.PIR, spacing=(1.5, 0.75, 1.65), image_order=3,
      max_intensity=spatial.SPINEPS_MAX_INTENSITY, max_voxels=spatial.DEFAULT_MAX_VOXELS))
  c.data.patch = patches.default_patch_config()
  c.data.patch.patch_size = (64, 128, 32)
  # The sacrum is in about a third of the phantom fields and few patches: two thirds of the patches
  # centre on a structure, drawn so that classes in few volumes come up more (data/patches.py).
  c.data.patch.foreground_fraction = 0.67
  c.data.patch.class_sampling = "dataset"
  c.data.patch.class_weight_power = 2.0
  c.data.num_workers = 0             # grain worker processes for patch sampling
  c.data.prep_workers = 2            # processes preparing volumes at start-up

  c.batch_size = 1
  c.num_train_steps = 1100
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-2, weight_decay=3e-5, b1=0.9, b2=0.999, momentum=0.99, nesterov=True,
      warmup_steps=50, schedule="poly", end_learning_rate_factor=0.0, grad_clip_norm=12.0))
  # Dice over the classes a patch holds: with batch 1, nnU-Net's mean over all classes rewards
  # suppressing everywhere a class that few patches hold, as the sacrum (training/losses.py).
  # dice_weight and ce_weight scale the two terms (nnU-Net: 1 and 1).
  c.loss = ml_collections.ConfigDict(dict(batch_dice=True, present_only=True, dice_weight=1.0, ce_weight=1.0))
  # Test-time mirroring along the axes training mirrors (R, with left and right swapped back), as
  # nnU-Net predicts by default: it doubles the sliding window's cost.
  c.inference = ml_collections.ConfigDict(dict(step_size=0.5, batch_size=2, mirror_axes=(2,),
                                               sliding_window_mode='spine_jax'))
  c.log_every = 50
  c.eval_every = 550                 # held-out Dice per structure during training (0: only at the end)
  c.checkpoint_every = 250
  c.keep_checkpoints = 2

  if "nnunet" in variants or "gpu" in variants:
    c.model = unet.default_unet_config()
    c.data.preprocess.spacing = spatial.REFERENCE_SPACING
    c.model.strides = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1))
    c.data.patch.patch_size = (128, 192, 64)
    c.data.phantom = mri_phantoms.whole_spine_config()
    c.batch_size = 2
    c.num_train_steps = 250_000
    c.loss.present_only = False  # nnU-Net's own Dice and patch sampling
    c.data.patch.foreground_fraction = 0.33
    c.data.patch.class_sampling = "volume"
    c.optimizer.update(name="sgd", learning_rate=1e-2, weight_decay=3e-5, warmup_steps=0, schedule="poly")
    c.log_every = 250
    c.checkpoint_every = 5000
  if "bf16" in variants or "gpu" in variants:
    c.model.dtype = "bfloat16"
  if "gpu" in variants:
    # Training activations in bf16 of the 6-stage 32..320 plan: at full resolution each of the 4 convolution
    # blocks (2 encoder, 2 decoder) keeps conv, norm and activation outputs of 32 channels and the decoder its
    # 64-channel concatenation, ~0.9 KB per voxel; each lower stage adds a quarter of that (8x fewer voxels, 2x the
    # channels): ~1.3 KB/voxel, ~2 GB per 128 x 192 x 64 sample. Batch 16: ~33 GB, half the device for XLA's
    # temporaries, the float32 loss over the deep-supervision outputs and the parameters' optimiser state.
    c.batch_size = 16
  if "smoke" in variants:
    c.model = unet.tiny_unet_config()
    c.data.patch.patch_size = (32, 64, 32)
    c.data.phantom = mri_phantoms.smoke_config()
    c.data.prep_workers = 1
    c.batch_size = 4
    c.num_train_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
  return c
