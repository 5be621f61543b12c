"""A tiny GPT on several processes with PyTorch's own engine: FSDP2 (``fully_shard``) shards
its blocks and embeddings, its LM head is split along the vocabulary (a ``Shard(0)`` DTensor),
and ``fusedce.linear_cross_entropy`` takes the loss from the hidden states and the sharded
head: no rank ever holds the (tokens x vocab) logits, or the whole head.

    torchrun --nproc-per-node 2 examples/fsdp_vocab_parallel.py           # CPU, gloo
    torchrun --nproc-per-node 2 examples/fsdp_vocab_parallel.py --cuda    # GPUs, NCCL
    python examples/fsdp_vocab_parallel.py --single                       # one process

Every rank trains on the same batches (the head is tensor-parallel: each rank holds a slice of
the vocabulary for the same tokens), so the losses printed equal those of ``--single``, which
trains the same model unsharded with ``F.cross_entropy`` on full logits.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fusedce
from fusedce.app.model import Block, GPTConfig

VOCAB = 50_257  # GPT-2's: split unevenly over 3 ranks, as DTensor splits it


class Body(nn.Module):
    """Embeddings, blocks and the final norm of a GPT: hidden states (batch, tokens, H)."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)


def build(seed=0):
    """The same body and head (V, H) weights for a seed, on the CPU."""
    cfg = GPTConfig(vocab_size=VOCAB, n_ctx=32, n_layer=2, n_head=2, n_embd=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = Body(cfg)
        head = torch.randn(VOCAB, cfg.n_embd) * 0.02
    return body, head


def batches(steps, device):
    """One batch of random tokens, ``steps`` times: the loss falls as the model learns it."""
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    for _ in range(steps):
        yield ids[:, :-1], ids[:, 1:]


def train_single(steps, lr):
    body, head = build()
    head = nn.Parameter(head)
    opt = torch.optim.SGD([*body.parameters(), head], lr=lr)
    losses = []
    for x, y in batches(steps, "cpu"):
        loss = F.cross_entropy(body(x).flatten(0, 1) @ head.t(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def train_sharded(steps, lr, cuda):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    device = "cpu"
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
    body, head = build()
    body.to(device)
    for block in body.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(body, mesh=mesh)  # the embeddings and the final norm
    head = nn.Parameter(distribute_tensor(head.to(device), mesh, [Shard(0)]))
    opt = torch.optim.SGD([*body.parameters(), head], lr=lr)
    losses = []
    for x, y in batches(steps, device):
        # a Replicate() DTensor: the same value on every rank
        loss = fusedce.linear_cross_entropy(body(x).flatten(0, 1), head, y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.full_tensor().item())
    rank = dist.get_rank()
    dist.barrier()  # every rank done before any tears the group down (gloo aborts else)
    dist.destroy_process_group()
    return losses if rank == 0 else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", action="store_true",
                        help="train unsharded in this one process (the reference)")
    parser.add_argument("--cuda", action="store_true",
                        help="one GPU per process and NCCL (default: CPU and gloo)")
    parser.add_argument("--steps", type=int, default=3, help="training steps (default: 3)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD step (default: 0.5)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.single and args.cuda:
        parser.error("--single trains on the CPU (the reference); --cuda is for torchrun")
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: CUDA is not available here (run without it: CPU and gloo)")
    if not args.single and "RANK" not in os.environ:
        parser.error("start it with torchrun (torchrun --nproc-per-node 2 "
                     "examples/fsdp_vocab_parallel.py), or pass --single for one process")
    losses = (train_single(args.steps, args.lr) if args.single
              else train_sharded(args.steps, args.lr, args.cuda))
    if losses is not None:
        print("losses", " ".join(f"{v:.6f}" for v in losses))
    if not args.single:
        leave_without_finalizing()


def leave_without_finalizing():
    """Ends a rank without Python's interpreter finalization, once the group is destroyed.

    FSDP2 and DTensor keep the device mesh, and through it the gloo process group, alive after
    ``destroy_process_group`` (DTensor's sharding caches hold the mesh), so gloo's worker
    threads still run while the interpreter shuts down. Now and then such a thread drops the
    last collective's work object only then; that needs the GIL, which a finalizing
    interpreter no longer hands out, and the process aborts ("terminate called without an
    active exception", found under gdb, about 1 run in 20 on a busy machine) after the
    training ended well. Nothing is left to run here, so the rank exits at once instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
