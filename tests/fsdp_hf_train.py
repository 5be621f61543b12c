"""A tiny Hugging Face GPT-2 with ``fusedce.hf.apply``, trained for three steps, for
tests/test_fsdp.py: ``--single`` unsharded with the model's own loss; under ``torchrun`` each
block and the whole model wrapped with FSDP2's ``fully_shard`` (gloo), every rank on its own
half of the batch. Prints the losses of the whole batch (the ranks' mean: their token counts
are equal)."""

import argparse

import torch
import transformers
from helpers import leave_rank

import fusedce.hf


def build():
    config = transformers.GPT2Config(vocab_size=50_257, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def train(model, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 50_257, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        out = model(input_ids=ids[rank::world], labels=ids[rank::world])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.detach())
    return torch.stack(losses)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--single", action="store_true")
    if parser.parse_args().single:
        print("losses", " ".join(f"{v:.6f}" for v in train(build()).tolist()))
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = fusedce.hf.apply(build())
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = train(model, dist.get_rank(), dist.get_world_size())
    dist.all_reduce(losses)
    if dist.get_rank() == 0:
        print("losses", " ".join(f"{v:.6f}" for v in (losses / dist.get_world_size()).tolist()))
    dist.barrier()  # every rank done before any tears the group down (gloo aborts else)
    dist.destroy_process_group()
    leave_rank()


if __name__ == "__main__":
    main()
