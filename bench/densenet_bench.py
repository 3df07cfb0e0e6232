"""DenseNet-121 (2D, 1 channel, 4 classes): spine_jax vs MONAI's PyTorch DenseNet121, one process.

  python bench/densenet_bench.py [--batch=8] [--size=224] [--repeats=5]

Times, side by side in one run: eval forward, and one training step (Adam, cross-entropy), each the
median of --repeats after a warm-up; JAX compile times separately. Needs the torch extra and MONAI
(`pip install -e ".[torch]"; pip install --no-deps monai`). Prints one JSON line.
"""
import argparse
import json
import os
import time

from _timing import median_time
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spine_jax.models import multitask
from spine_jax.training import losses



def bench_jax(batch, size, repeats):
  cfg = multitask.default_model_config()
  cfg.kind, cfg.trunk = "single_quality", "densenet121"
  model = multitask.build_model(cfg)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 1)), jnp.float32)
  y = jnp.asarray(np.arange(batch) % 4)
  variables = model.init(jax.random.key(0), x[:1], train=False)
  tx = optax.adam(1e-4)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def forward(v, x):
    return model.apply(v, x, train=False)["quality"]

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      out, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
      return losses.smoothed_cross_entropy(out["quality"], y, 0.0).mean(), upd
    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

  t = time.perf_counter()
  forward(variables, x).block_until_ready()
  compile_fwd = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(train_step(variables["params"], variables["batch_stats"], opt_state, x, y))
  compile_train = time.perf_counter() - t
  fwd = median_time(lambda: forward(variables, x).block_until_ready(), repeats)
  state = [variables["params"], variables["batch_stats"], opt_state]

  def one_step():
    p, b, o, loss = train_step(*state, x, y)
    state[:] = [p, b, o]
    loss.block_until_ready()
  step = median_time(one_step, repeats)
  return {"forward_s": fwd, "train_step_s": step, "compile_forward_s": compile_fwd, "compile_train_step_s": compile_train}


def bench_torch(batch, size, repeats):
  import torch
  from monai.networks.nets import DenseNet121
  torch.manual_seed(0)
  model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=4)
  x = torch.randn(batch, 1, size, size)
  y = torch.arange(batch) % 4
  opt = torch.optim.Adam(model.parameters(), 1e-4)
  model.eval()
  with torch.no_grad():
    model(x)
    fwd = median_time(lambda: model(x), repeats)
  model.train()

  def one_step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
  one_step()
  step = median_time(one_step, repeats)
  return {"forward_s": fwd, "train_step_s": step, "torch_threads": torch.get_num_threads()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args()
  ours = bench_jax(a.batch, a.size, a.repeats)
  peer = bench_torch(a.batch, a.size, a.repeats)
  print(json.dumps({
      "machine": f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}", "batch": a.batch, "size": a.size,
      "spine_jax": ours, "monai": peer,
      "forward_speed_ratio_peer_over_ours": peer["forward_s"] / ours["forward_s"],
      "train_step_speed_ratio_peer_over_ours": peer["train_step_s"] / ours["train_step_s"]}, indent=1))


if __name__ == "__main__":
  main()
