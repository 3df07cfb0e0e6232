"""Shared by the benchmark scripts: a PyTorch peer's eval forward and training step as no-argument callables."""
import contextlib


def step_calls(net, x, loss_of, opt, device="cpu", autocast=False, compile_model=False) -> dict:
  """{'forward', 'train_step'} of `net` on input `x`, each waiting for the device. `loss_of(outputs)` is the
  peer's loss; `autocast`: bf16 mixed precision (torch.autocast); `compile_model`: torch.compile, as nnU-Net."""
  import torch
  run = torch.compile(net) if compile_model else net
  amp = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def forward():
    net.eval()
    with torch.no_grad(), amp():
      run(x)
    sync()

  def train_step():
    net.train()
    opt.zero_grad()
    with amp():
      loss = loss_of(run(x))
    loss.backward()
    opt.step()
    sync()
  return {"forward": forward, "train_step": train_step}
