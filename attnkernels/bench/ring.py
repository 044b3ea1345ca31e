"""Ring attention against one process at the same total length, and how much transfer it hides.

    python -m attnkernels.bench.ring --nproc 2                       # CPU, gloo, 2 processes
    python -m attnkernels.bench.ring --nproc 4 --length 8192 --causal
    python -m attnkernels.bench.ring --nproc 2 --device cuda         # NCCL, one GPU per process

Spawns ``nproc`` processes on 127.0.0.1 and times, as the median over ``--repeat`` runs of the
slowest rank, the forward and the forward + backward of:

- ``ring``: ``ring_attention`` on the shards, transfers overlapped with the block computations;
- ``compute only``: the same block computations with no transfers (each rank reuses its own block);
- ``transfers only``: the same point-to-point transfers with no computation;

and, in this process before the spawn, ``one process``: attention over the full length
(``attention_with_lse``, with all of this process's threads). ``hidden`` is the fraction of the
transfer time that the ring hides behind computation: (compute + transfers - ring) / transfers,
reported when the transfers take at least a tenth of the compute time (below that, run-to-run
noise on a shared machine is larger than what is being measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import attention_with_lse
from ..attention import attention_backend
from ..distributed import _Ring, _RingAttention, _Transfer, ring_attention, shard_sequence
from ..reference.attention import accumulation_dtype, default_scale


class _NoTransferRing(_Ring):
    """A ring whose transfers hand back what was sent: the block computations alone, same shapes and plan."""

    def shift(self, tensors):
        return _Transfer([], tensors, tensors)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(fns: dict, repeat: int, device: torch.device, group=None) -> dict[str, float]:
    """For each named callable, the median over ``repeat`` runs of the slowest rank's time (seconds).

    One warm-up run each, then the callables take turns, so that load from other jobs on the
    machine falls on all of them alike.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _synchronize(device)
            if group is not None:
                dist.barrier(group)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64,
                                   device=device if group is not None and device.type == "cuda" else "cpu")
            if group is not None:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
            times[name].append(elapsed.item())
    return {name: statistics.median(t) for name, t in times.items()}


def _inputs(args, device, length):
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    shape = (args.batch, args.heads, length, args.head_dim)
    return draw(*shape), draw(*shape), draw(*shape), draw(*shape)


def _forward_backward(fn, q, k, v, grad_out):
    def run():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        fn(q_, k_, v_).backward(grad_out)
    return run


def _rank_main(rank: int, world: int, port: int, args, result_path: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = torch.device("cpu")
    backend = "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        torch.set_num_threads(max(1, args.threads // world))  # the cores shared out between the ranks
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        group = dist.group.WORLD
        q, k, v, grad_out = (shard_sequence(t, -2) for t in _inputs(args, device, args.length))
        scale = default_scale(args.head_dim)
        ring = _Ring(group, rank, world, load_balance=True)
        local = _NoTransferRing(group, rank, world, load_balance=True)

        def ring_fn(q_, k_, v_):
            return ring_attention(q_, k_, v_, is_causal=args.causal)

        # the backend ring_attention picks for these shards, so that both time the same block kernels
        backend = attention_backend("ring_attention", q, k, v, None, 0.0, None)

        def compute_fn(q_, k_, v_):
            return _RingAttention.apply(q_, k_, v_, None, args.causal, scale, False, backend, local)

        acc = accumulation_dtype(q.dtype)
        gradients = [torch.zeros(k.shape, dtype=acc, device=device), torch.zeros(v.shape, dtype=acc, device=device)]

        def transfers(backward: bool):
            def run():
                for _ in range(world - 1):  # forward: K and V, P - 1 hops
                    ring.shift([k, v]).wait()
                if backward:  # backward: K and V again, and dK, dV for P hops
                    for _ in range(world - 1):
                        ring.shift([k, v]).wait()
                    for _ in range(world):
                        ring.shift(gradients).wait()
            return run

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn(q, k, v)
            return run

        results = _median_times({
            "ring forward": no_grad(ring_fn),
            "compute only forward": no_grad(compute_fn),
            "transfers only forward": transfers(False),
            "ring forward+backward": _forward_backward(ring_fn, q, k, v, grad_out),
            "compute only forward+backward": _forward_backward(compute_fn, q, k, v, grad_out),
            "transfers only forward+backward": transfers(True),
        }, args.repeat, device, group)
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()
    # End without interpreter finalisation: gloo's worker threads outlive destroy_process_group, and one
    # that frees a finished collective's buffers while the interpreter finalises can abort the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(args, device: torch.device) -> dict[str, float]:
    """Attention over the full length in this process."""
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    q, k, v, grad_out = _inputs(args, device, args.length)

    def single(q_, k_, v_):
        return attention_with_lse(q_, k_, v_, is_causal=args.causal)[0]

    def forward():
        with torch.no_grad():
            single(q, k, v)

    results = _median_times({"one process forward": forward,
                             "one process forward+backward": _forward_backward(single, q, k, v, grad_out)},
                            args.repeat, device)
    return results


def run(args) -> dict[str, float]:
    """Every timing, in seconds: the one-process baseline here, then the ring in ``args.nproc`` processes."""
    results = _one_process(args, torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ring.json")
        mp.start_processes(_rank_main, args=(args.nproc, _free_port(), args, path), nprocs=args.nproc,
                           start_method="spawn")
        with open(path) as f:
            results.update(json.load(f))
    return results


def report(args, results: dict[str, float]) -> str:
    lines = [f"ring attention, {args.nproc} processes ({args.device}), batch {args.batch}, {args.heads} heads, "
             f"length {args.length}, head dim {args.head_dim}, {args.dtype}, "
             f"{'causal (zig-zag load balance)' if args.causal else 'non-causal'}, median of {args.repeat}"]
    for kind in ("forward", "forward+backward"):
        one = results[f"one process {kind}"]
        ring = results[f"ring {kind}"]
        compute = results[f"compute only {kind}"]
        transfers = results[f"transfers only {kind}"]
        if transfers >= 0.1 * compute:
            hidden = f"hidden {(compute + transfers - ring) / transfers:5.0%} of the transfer time"
        else:  # a few percent of the compute: smaller than run-to-run noise on a shared machine
            hidden = f"transfers {transfers / compute:.0%} of the compute, too small to measure the overlap"
        lines.append(f"  {kind:17s} one process {one * 1e3:9.1f} ms | ring {ring * 1e3:9.1f} ms "
                     f"({one / ring:4.2f}x) | compute only {compute * 1e3:9.1f} ms | transfers only "
                     f"{transfers * 1e3:8.1f} ms | {hidden}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkernels.bench.ring", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes in the ring (default 2)")
    parser.add_argument("--length", type=int, default=4096, help="total sequence length L = S (default 4096)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--causal", action="store_true", help="causal attention (zig-zag load balance)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads in all, shared out between the ranks (default: every core)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (default 5)")
    args = parser.parse_args(argv)
    if args.nproc < 1 or args.length % (2 * args.nproc):
        parser.error(f"--length ({args.length}) must be divisible by 2 × --nproc ({2 * args.nproc})")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(f"--device cuda needs a GPU per process: {torch.cuda.device_count()} found")
    print(report(args, run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
