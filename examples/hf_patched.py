"""Third-party code on fusedce without editing it: a Hugging Face GPT-2 inside fusedce.patched().

    pip install -e ".[hf]" && python examples/hf_patched.py

transformers computes its causal-LM loss with ``nn.functional.cross_entropy``; inside
``fusedce.patched()`` that is fusedce's. The model here is randomly initialised (no download);
``GPT2LMHeadModel.from_pretrained("gpt2")`` works the same way.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fusedce

torch.manual_seed(0)
# vocab 50,257; no dropout, so that the two steps below see the same network
config = GPT2Config(n_layer=2, n_head=2, n_embd=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
model = GPT2LMHeadModel(config)
model.loss_type = "ForCausalLM"  # the loss it computes; unset, transformers 5 warns
# 4 x 64 tokens: 252 x 50,257 fp32 logits, past the size from which fusedce's own CPU path
# serves a call (smaller ones go to PyTorch's loss, which would compare PyTorch with itself)
ids = torch.randint(0, model.config.vocab_size, (4, 64))


def step():
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), model.transformer.wte.weight.grad.clone()


loss_torch, grad_torch = step()
with fusedce.patched():  # or fusedce.patch() once at start-up
    loss_fused, grad_fused = step()
print(f"loss: PyTorch {loss_torch:.6f}, fusedce {loss_fused:.6f}")
print(
    f"largest |difference| of the embedding gradient: "
    f"{(grad_fused - grad_torch).abs().max().item():.3e}"
)
