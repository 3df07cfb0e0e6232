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
from _torch_calls import step_calls
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


class TorchMultitask:
  """Builds MONAI's DenseNet with our trunk's preset and our multi-task heads (per head Linear-ReLU-Linear on
  the pooled features; one logit for a binary head): the PyTorch peer of `multitask.build_model`."""

  @staticmethod
  def build(trunk: dict, heads: dict[str, int], hidden: int, in_channels: int = 1):
    import torch
    from monai.networks.nets import DenseNet

    class Net(torch.nn.Module):
      def __init__(self):
        super().__init__()
        net = DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=1, init_features=trunk["num_init_features"],
                       growth_rate=trunk["growth_rate"], block_config=tuple(trunk["block_config"]),
                       bn_size=trunk["bn_size"])
        self.features = net.features
        width = net.class_layers.out.in_features
        self.heads = torch.nn.ModuleDict({name: torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n)) for name, n in heads.items()})

      def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.features(x)), 1).flatten(1)
        return {name: head(f) for name, head in self.heads.items()}
    return Net()


def torch_multitask_calls(trunk, heads, hidden, batch, size, in_channels=1, device="cpu", autocast=False,
                          compile_model=False):
  """{'forward', 'train_step'} no-argument callables of the multi-task peer (AdamW, the heads' cross-entropies
  summed; a binary head with BCE), waiting for the device."""
  import torch
  torch.manual_seed(0)
  net = TorchMultitask.build(trunk, heads, hidden, in_channels).to(device)
  x = torch.randn(batch, in_channels, *size, device=device)
  y = {name: torch.arange(batch, device=device) % max(n, 2) for name, n in heads.items()}

  def loss_of(out):
    total = 0.0
    for name, logits in out.items():
      logits = logits.float()
      total = total + (torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y[name].float())
                       if logits.shape[1] == 1 else torch.nn.functional.cross_entropy(logits, y[name]))
    return total
  return step_calls(net, x, loss_of, torch.optim.AdamW(net.parameters(), 1e-4), device, autocast, compile_model)


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
