"""Public PyTorch weights -> spine_jax parameters, so users who have them run the real models here.

One module per source, each on the shared helpers of ``torch_files`` (safe reading) and
``layout`` (PyTorch -> Flax tensor layouts, shape checks, error figures):

* ``densenet``: torchvision / MONAI DenseNet-121/169/201 state dicts -> the classifier's trunk
  (2D, or inflated to 3D; first conv adapted to the model's input channels).
* ``nnunet``: an nnU-Net v2 model folder (plans.json, dataset.json, fold_k/checkpoint_final.pth)
  -> a semantic U-Net model bundle (``engine/bundle.py``) that ``predict semantic`` loads like its own.
* ``spineps_folder``: what is particular to SPINEPS' model folders (inference_config.json, TPTBox
  label names); its semantic model is an nnU-Net folder and goes through ``nnunet``.
* ``spineps``: SPINEPS' instance network (Lightning ``*weights*.ckpt``) and the model set.
* ``spineps_labeling``: SPINEPS' labelling classifier (``*val_f1=*valf1-weights.ckpt``) -> a labelling bundle.
* ``export_spineps``: the way back, bundles -> SPINEPS model folders.

Every converter refuses bad input with a ``ConversionError`` naming the file and the key, field or
shape (expected vs found), and writes nothing unless the whole conversion succeeded.
"""
from spine_jax.conversion.errors import ConversionError

__all__ = ["ConversionError"]
