"""A Hugging Face GPT-2 fine-tuned with ``fusedce.hf.apply``: its loss from the hidden states,
never the (tokens x vocab) logits.

    pip install -e ".[hf]" && python examples/hf_apply.py

The model is small and randomly initialised (no download); ``GPT2LMHeadModel.from_pretrained
("gpt2")`` works the same way, and so do Llama, Mistral, Qwen2, Gemma-2 and Phi-3 models.
A few AdamW steps on one repeated batch: the loss falls, as with the unpatched model, whose
losses are printed beside (same start, same data). ``generate`` is the model's own, and so
is a labelled call under ``torch.no_grad()`` (evaluation: it returns the logits).
"""

import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fusedce.hf

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_head=2, n_embd=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
plain = GPT2LMHeadModel(config)
plain.loss_type = "ForCausalLM"  # the loss it computes; unset, transformers 5 warns
fused = fusedce.hf.apply(copy.deepcopy(plain))
ids = torch.randint(0, config.vocab_size, (4, 64))
labels = ids.clone()
labels[:, :8] = -100  # e.g. a prompt that is not trained on

optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, fused)}
for step in range(5):
    losses = []
    for model in (plain, fused):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad()
        losses.append(out.loss.item())
    print(f"step {step}: unpatched {losses[0]:.5f}   fusedce.hf {losses[1]:.5f}")

print("generated:", fused.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)[0].tolist())
