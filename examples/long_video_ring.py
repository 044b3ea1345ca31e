"""Sequence-parallel temporal self-attention over a long clip with ring attention.

A clip of T frames × P patches is one sequence of T·P tokens (64 × 16 = 1024 here; the point of
the ring is that it scales to lengths one device cannot hold). Each rank holds 1/N of the tokens
(zig-zag chunks) and the attention layer runs as ``attnkernels.distributed.ring_attention``, so no
rank ever holds the full key sequence or the full score matrix.

The task needs attention across the whole clip: in half of the clips one random frame holds an
event (a pattern added to its patches), and every token, wherever it is, must say whether its clip
has the event, so each token has to find the event's tokens, which are usually on another rank.

    torchrun --nproc_per_node=2 examples/long_video_ring.py    # gloo on CPU (~45 s on 2 cores), NCCL on GPUs
    python examples/long_video_ring.py                         # a group of one process

First it checks one training step: the loss and every parameter gradient of the ring model (each
rank's gradients summed over the ranks) against the same model run in one process with plain
attention over the whole sequence, in float64. Then it trains for a few steps in float32.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import attnkernels
from attnkernels.distributed import ring_attention, shard_sequence


class TemporalSelfAttention(nn.Module):
    """One pre-norm transformer block over a clip's tokens and a per-token head.

    x: (N, tokens, dim): all tokens in one process (``sequence_parallel=False``), or this rank's
    shard of them (True, the attention then runs round the ring) -> logits (N, tokens), same layout.
    """

    def __init__(self, in_dim: int, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        x = self.embed(tokens) + positions
        n, length, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if sequence_parallel:
            attended = ring_attention(q, k, v)  # this rank's rows; keys and values come round the ring
        else:
            attended = attnkernels.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, length, dim))
        x = x + self.mlp(x)
        return self.head(x).squeeze(-1)


def frame_positions(frames: int, patches: int, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of each token's frame index (patches of a frame share it): (frames·patches, dim)."""
    frame = torch.arange(frames, dtype=torch.float64).repeat_interleave(patches)
    rates = torch.exp(-math.log(1000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = frame[:, None] * rates[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim].float()


def make_batch(step: int, batch: int, frames: int, patches: int, in_dim: int):
    """The same full batch on every rank (seeded by step): tokens (N, T·P, in_dim), labels (N, T·P).

    Step -1 is the held-out evaluation batch."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randn(batch, frames, patches, in_dim, generator=generator)
    pattern = torch.randn(in_dim, generator=torch.Generator().manual_seed(0))
    event = torch.randint(0, frames, (batch,), generator=generator)
    has_event = torch.rand(batch, generator=generator) < 0.5
    tokens[torch.arange(batch), event] += 3.0 * has_event[:, None, None] * pattern
    labels = has_event.float()[:, None].expand(batch, frames * patches)
    return tokens.flatten(1, 2), labels


def summed_gradients(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter's gradient summed over the ranks (each rank's loss covers its own tokens)."""
    grads = [p.grad.detach().clone() for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g)
    return grads


def check_one_step(model: nn.Module, args, positions: torch.Tensor, device: torch.device, log) -> None:
    """Loss and gradients of the ring model equal those of one process with plain attention (float64)."""
    model = copy.deepcopy(model).double()
    tokens, labels = (t.double().to(device) for t in make_batch(0, args.batch, args.frames, args.patches, args.in_dim))
    positions = positions.double().to(device)
    total = labels.numel()

    model.zero_grad()
    logits = model(shard_sequence(tokens, 1), shard_sequence(positions, 0), sequence_parallel=True)
    local_loss = F.binary_cross_entropy_with_logits(logits, shard_sequence(labels, 1), reduction="sum") / total
    local_loss.backward()
    ring_loss = local_loss.detach().clone()
    dist.all_reduce(ring_loss)
    ring_grads = summed_gradients(model)

    model.zero_grad()
    full_loss = F.binary_cross_entropy_with_logits(model(tokens, positions, sequence_parallel=False), labels)
    full_loss.backward()
    worst = max((a - p.grad).abs().max().item() for a, p in zip(ring_grads, model.parameters(), strict=True))
    log(f"one step, float64: loss ring {ring_loss.item():.12f} vs one process {full_loss.item():.12f}; "
        f"largest gradient difference {worst:.1e}")
    if abs(ring_loss.item() - full_loss.item()) > 1e-10 or worst > 1e-10:
        raise RuntimeError("the ring model's loss or gradients differ from the one-process model's")


def train(model: nn.Module, args, positions: torch.Tensor, device: torch.device, log) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    my_positions = shard_sequence(positions.to(device), 0)
    loss_value = float("nan")
    for step in range(1, args.steps + 1):
        tokens, labels = make_batch(step, args.batch, args.frames, args.patches, args.in_dim)
        tokens, labels = shard_sequence(tokens.to(device), 1), shard_sequence(labels.to(device), 1)
        logits = model(tokens, my_positions, sequence_parallel=True)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / (labels.numel() * args.world)
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # the same summed gradient on every rank keeps the replicas equal
            dist.all_reduce(p.grad)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            stats = torch.stack([loss.detach() * args.world,
                                 ((logits > 0) == (labels > 0.5)).float().mean()])
            dist.all_reduce(stats)
            loss_value, accuracy = (stats / args.world).tolist()
        if step % args.log_every == 0 or step == args.steps:
            log(f"step {step:3d}  loss {loss_value:.4f}  token accuracy {accuracy:.3f}")
    return loss_value


@torch.no_grad()
def evaluate(model: nn.Module, args, positions: torch.Tensor, device: torch.device) -> float:
    """Token accuracy on the held-out batch (step -1) of 4 × --batch clips, over every rank's tokens."""
    tokens, labels = make_batch(-1, 4 * args.batch, args.frames, args.patches, args.in_dim)
    tokens, labels = shard_sequence(tokens.to(device), 1), shard_sequence(labels.to(device), 1)
    logits = model(tokens, shard_sequence(positions.to(device), 0), sequence_parallel=True)
    correct = ((logits > 0) == (labels > 0.5)).float().mean().reshape(1)
    dist.all_reduce(correct)
    return correct.item() / args.world


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--patches", type=int, default=16, help="tokens per frame")
    parser.add_argument("--in-dim", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:  # a group of one process, so that the same code runs
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    rank, args.world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))  # share the cores between the ranks
    tokens = args.frames * args.patches
    if tokens % (2 * args.world):
        parser.error(f"frames × patches ({tokens}) must be divisible by 2 × the number of processes")

    def log(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    log(f"{args.world} process(es) on {device.type}: {tokens} tokens per clip, {tokens // args.world} per rank")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TemporalSelfAttention(args.in_dim, args.dim, args.heads).to(device)
    positions = frame_positions(args.frames, args.patches, args.dim)
    check_one_step(model, args, positions, device, log)
    start = time.perf_counter()
    loss = train(model, args, positions, device, log)
    log(f"{args.steps} steps in {time.perf_counter() - start:.1f} s; held-out token accuracy "
        f"{evaluate(model, args, positions, device):.3f}")
    dist.destroy_process_group()
    return loss


if __name__ == "__main__":
    from torchrun_exit import run_as_script  # examples/ is the script's directory: on sys.path

    run_as_script(main)
