"""fusedce next to torch.nn.functional.cross_entropy on a real (tokens x 50,257) batch."""

import time

import torch
import torch.nn.functional as F

import fusedce

VOCAB = 50_257  # GPT-2's vocabulary
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
logits = torch.randn(512, VOCAB, device=device)
target = torch.randint(0, VOCAB, (512,), device=device)


def run(fn):
    x = logits.clone().requires_grad_()
    start = time.perf_counter()
    loss = fn(x, target)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return loss.detach(), x.grad, time.perf_counter() - start


loss_f, grad_f, t_f = run(fusedce.cross_entropy)
loss_t, grad_t, t_t = run(F.cross_entropy)
print(f"device {device}, logits {tuple(logits.shape)} fp32")
print(f"fusedce.cross_entropy    loss {loss_f.item():.6f}  ({t_f * 1e3:.1f} ms fwd+bwd)")
print(f"F.cross_entropy          loss {loss_t.item():.6f}  ({t_t * 1e3:.1f} ms fwd+bwd)")
print(f"largest gradient difference  {(grad_f - grad_t).abs().max().item():.3e}")
