"""Semantic U-Net (PlainConvUNet): spine_jax vs nnU-Net's PyTorch class, one process, side by side.

  python bench/unet_bench.py                       # SPEC's peer row: 6 stages 32..320, 1x1x128x128x32
  python bench/unet_bench.py --config=configs/semantic.py    # the network and patch of a config
  python bench/unet_bench.py --config=configs/semantic.py:nnunet --batch=2 --no_torch
  python bench/unet_bench.py --config=configs/semantic.py --features=16,16,32,64,128 --no_torch

Times, in one run: eval forward and one SGD (Nesterov 0.99) training step with Dice + CE over the
deep-supervision outputs, each the median of --repeats after a warm-up; JAX compile times apart.
The peer is `dynamic_network_architectures`' PlainConvUNet with the same plan (`pip install -e
".[torch]"; pip install --no-deps dynamic-network-architectures==0.4.4`); its loss is plain CE over
the same outputs (nnU-Net's Dice term adds little compute). Prints one JSON line.
"""
import argparse
import json
import os
import time

from _timing import median_time
from _torch_calls import step_calls
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spine_jax.models import unet
from spine_jax.training import losses



def _model_and_patch(config_arg):
  if not config_arg:
    cfg = unet.default_unet_config()
    cfg.strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1))
    return cfg, (128, 128, 32)
  import importlib.util
  path, _, variant = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  return c.model, tuple(c.data.patch.patch_size)


def bench_jax(model_cfg, patch, batch, repeats):
  model = unet.build_unet(model_cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, *patch, model_cfg.in_channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, model_cfg.num_classes, size=(batch, *patch)), jnp.int32)
  params = model.init(jax.random.key(0), x[:1], train=False)["params"]
  tx = optax.sgd(1e-2, momentum=0.99, nesterov=True)
  opt_state = tx.init(params)

  @jax.jit
  def forward(p, x):
    out = model.apply({"params": p}, x, train=False)
    return out[0] if isinstance(out, (list, tuple)) else out

  @jax.jit
  def train_step(p, opt_state, x, y):
    def loss_fn(p):
      return losses.deep_supervision_loss(model.apply({"params": p}, x, train=True), y)[0]
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  t = time.perf_counter()
  forward(params, x).block_until_ready()
  compile_fwd = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(train_step(params, opt_state, x, y))
  compile_train = time.perf_counter() - t
  fwd = median_time(lambda: forward(params, x).block_until_ready(), repeats)
  state = [params, opt_state]

  def one_step():
    p, o, loss = train_step(*state, x, y)
    state[:] = [p, o]
    loss.block_until_ready()
  step = median_time(one_step, repeats)
  return {"forward_s": fwd, "train_step_s": step, "compile_forward_s": compile_fwd,
          "compile_train_step_s": compile_train}


def torch_unet(model_cfg):
  """dynamic_network_architectures' PlainConvUNet with the plan of `model_cfg` (deep supervision on)."""
  import torch
  from dynamic_network_architectures.architectures.unet import PlainConvUNet
  return PlainConvUNet(
      model_cfg.in_channels, model_cfg.n_stages, list(model_cfg.features_per_stage), torch.nn.Conv3d,
      [list(k) for k in model_cfg.kernel_sizes], [list(s) for s in model_cfg.strides],
      list(model_cfg.n_conv_per_stage), model_cfg.num_classes, list(model_cfg.n_conv_per_stage_decoder),
      conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
      nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"negative_slope": 0.01, "inplace": True},
      deep_supervision=True)


def torch_calls(model_cfg, patch, batch, device="cpu", autocast=False, compile_model=False):
  """{'forward': eval forward, 'train_step': one SGD step with CE over the deep-supervision outputs} of the
  PyTorch peer, each a no-argument callable that waits for the device; `autocast`: bf16 mixed precision
  (torch.autocast), `compile_model`: torch.compile as nnU-Net does."""
  import torch
  torch.manual_seed(0)
  net = torch_unet(model_cfg).to(device)
  # Channels-first, and PyTorch's (D, H, W) = our three spatial axes in order.
  x = torch.randn(batch, model_cfg.in_channels, *patch, device=device)
  y = torch.randint(0, model_cfg.num_classes, (batch, *patch), device=device)

  def loss_of(outs):
    loss = 0.0
    for out in outs:
      f = [a // b for a, b in zip(patch, out.shape[2:])]
      loss = loss + torch.nn.functional.cross_entropy(out.float(), y[:, ::f[0], ::f[1], ::f[2]])
    return loss
  opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
  return step_calls(net, x, loss_of, opt, device, autocast, compile_model)


def bench_torch(model_cfg, patch, batch, repeats):
  import torch
  calls = torch_calls(model_cfg, patch, batch)
  return {"forward_s": median_time(calls["forward"], repeats, warmup=True),
          "train_step_s": median_time(calls["train_step"], repeats, warmup=True),
          "torch_threads": torch.get_num_threads()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="", help="configs/semantic.py[:variant]; empty: SPEC's peer row")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no_torch", action="store_true", help="time spine_jax only")
  ap.add_argument("--features", default="", help="features per stage, e.g. 16,16,32,64,128 (default: the config's)")
  ap.add_argument("--patch", default="", help="patch sides P,I,R (default: the config's)")
  ap.add_argument("--conv", default="", help="convolution form (models/conv.py: auto, xla, sliced, fft, tapsum; "
                  "default: the config's)")
  a = ap.parse_args()
  model_cfg, patch = _model_and_patch(a.config)
  if a.features:
    features = tuple(int(v) for v in a.features.split(","))
    if len(features) != model_cfg.n_stages:
      raise SystemExit(f"--features: {len(features)} values for {model_cfg.n_stages} stages")
    model_cfg.features_per_stage = features
  if a.patch:
    patch = tuple(int(v) for v in a.patch.split(","))
  if a.conv:
    model_cfg.conv = a.conv
  ours = bench_jax(model_cfg, patch, a.batch, a.repeats)
  result = {"machine": f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}", "config": a.config or "spec-peer",
            "conv": model_cfg.get("conv", "auto"), "features": list(model_cfg.features_per_stage),
            "strides": [list(s) for s in model_cfg.strides],
            "patch": list(patch), "batch": a.batch, "spine_jax": ours}
  if not a.no_torch:
    peer = bench_torch(model_cfg, patch, a.batch, a.repeats)
    result.update({"pytorch": peer, "forward_speed_ratio_peer_over_ours": peer["forward_s"] / ours["forward_s"],
                   "train_step_speed_ratio_peer_over_ours": peer["train_step_s"] / ours["train_step_s"]})
  print(json.dumps(result))


if __name__ == "__main__":
  main()
