"""Action recognition on synthetic videos with attnkernels modules, single process or DDP.

A shape (circle or square) moves through a noisy 32x32 clip with a static distractor; the class is
its motion: right, left, down, up, clockwise, anticlockwise, grow or shrink. Videos are generated
on the fly from a seed (no downloads). The model:

    video (N, 1, T, H, W)
      -> 3-D SpatialTransformer (an attention crop in space and time, fused affine sampler)
      -> per-frame conv encoder -> feature maps (N, T, C, h, w) + coordinate channels
      -> SpatialSoftAttention: LSTM-driven soft attention over each frame's locations
      -> MultiheadSelfAttention over the frames (+ learned frame positions), pooled
      -> linear classifier

Run:
    python examples/action_recognition.py                         # a few minutes on a 2-core CPU
    torchrun --nproc_per_node=2 examples/action_recognition.py    # DDP: gloo on CPU, NCCL on GPU

Every rank generates the same global batch from (seed, step) and trains on its slice, and DDP
averages the gradients, so N processes take the same steps as one process with the whole batch.
It prints progress, the test accuracy, and saves a PNG of the learned crops and attention maps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from attnkernels.nn import MultiheadSelfAttention, SpatialSoftAttention, SpatialTransformer

MOTIONS = ("right", "left", "down", "up", "clockwise", "anticlockwise", "grow", "shrink")


@dataclasses.dataclass
class Config:
    frames: int = 8
    size: int = 32            # input frames are size x size
    crop: int = 24            # the spatial transformer samples crop x crop per frame
    channels: int = 32        # conv encoder output channels
    hidden: int = 64          # recurrent state of the soft attention
    model_dim: int = 64
    heads: int = 4
    dropout: float = 0.0
    steps: int = 400
    batch_size: int = 32      # global batch, split over the ranks
    lr: float = 3e-3
    stn_lr_scale: float = 0.1  # the localisation net learns slower: at full rate the crop can collapse to a point
    weight_decay: float = 1e-4
    test_size: int = 1024
    seed: int = 0
    log_every: int = 50
    noise: float = 0.15
    dtype: str = "float32"    # parameters and activations; float64 makes runs with different summation orders agree


TINY = Config(frames=4, size=16, crop=12, channels=8, hidden=16, model_dim=16, heads=2, steps=3, batch_size=8,
              test_size=16, log_every=1)


# ----------------------------------------------------------------------------- synthetic data


def _uniform(generator: torch.Generator, n: int, low, high) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def make_batch(config: Config, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``batch`` clips and their motion labels.

    returns: videos (batch, 1, T, S, S) float32 in about [0, 1] plus noise; labels (batch,) int64.
    """
    t_count, s = config.frames, config.size
    labels = torch.randint(len(MOTIONS), (batch,), generator=generator)
    t = torch.arange(t_count, dtype=torch.float32) - (t_count - 1) / 2          # centred time
    scale = s / 32                                                           # sizes below are for 32 px
    radius = _uniform(generator, batch, 3.0, 4.5) * scale
    margin = 5.0 * scale

    # Straight motions: the path's midpoint is random, the path stays in the frame.
    speed = _uniform(generator, batch, 1.2, 2.0) * scale * 8 / t_count
    half_path = speed * (t_count - 1) / 2
    mid = torch.stack([_uniform(generator, batch, 0.0, 1.0), _uniform(generator, batch, 0.0, 1.0)], -1)
    mid = margin + half_path[:, None] + mid * (s - 1 - 2 * margin - 2 * half_path[:, None])
    direction = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])[labels.clamp(max=3)]
    straight = mid[:, None] + direction[:, None] * speed[:, None, None] * t[None, :, None]

    # Orbits: clockwise on screen is increasing angle, since y points down.
    orbit = _uniform(generator, batch, 5.0, 7.0) * scale
    omega = _uniform(generator, batch, 0.5, 0.75) * 8 / t_count
    phase = _uniform(generator, batch, 0.0, 2 * math.pi)
    centre = margin + orbit[:, None] + torch.rand(batch, 2, generator=generator) * (
        s - 1 - 2 * margin - 2 * orbit[:, None])
    sign = torch.where(labels == 4, 1.0, -1.0)
    angle = phase[:, None] + sign[:, None] * omega[:, None] * t[None, :]
    circular = centre[:, None] + orbit[:, None, None] * torch.stack([angle.cos(), angle.sin()], -1)

    # Grow / shrink in place.
    still = (margin + 3 * scale + torch.rand(batch, 2, generator=generator) * (s - 1 - 2 * margin - 6 * scale))
    still = still[:, None].expand(batch, t_count, 2)
    ramp = (t / (t_count - 1) + 0.5)[None, :]                                 # 0 .. 1 over the clip
    growing = (1.5 + 5.0 * ramp) * scale
    shrinking = (6.5 - 5.0 * ramp) * scale

    kind = labels[:, None, None]
    position = torch.where(kind < 4, straight, torch.where(kind < 6, circular, still))
    radius = radius[:, None].expand(batch, t_count)
    radius = torch.where(labels[:, None] == 6, growing, torch.where(labels[:, None] == 7, shrinking, radius))

    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    dx = xs - position[..., 0, None, None]
    dy = ys - position[..., 1, None, None]
    square = torch.rand(batch, generator=generator) < 0.5
    distance = torch.where(square[:, None, None, None], torch.maximum(dx.abs(), dy.abs()), torch.hypot(dx, dy))
    video = torch.sigmoid(2.0 * (radius[..., None, None] - distance))          # soft edges, (B, T, S, S)

    # A static distractor square, dimmer than the actor.
    spot = margin + torch.rand(batch, 2, generator=generator) * (s - 1 - 2 * margin)
    chebyshev = torch.maximum((xs - spot[:, 0, None, None]).abs(), (ys - spot[:, 1, None, None]).abs())
    video = video + 0.5 * torch.sigmoid(2.0 * (2.0 * scale - chebyshev))[:, None]
    video = video + config.noise * torch.randn(video.shape, generator=generator)
    return video.unsqueeze(1), labels


def batch_for_step(config: Config, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global training batch of ``step``: the same on every rank."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1)
    return make_batch(config, config.batch_size, generator)


def test_set(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_999_937)
    return make_batch(config, config.test_size, generator)


# ----------------------------------------------------------------------------- model


def _with_coordinates(images: torch.Tensor) -> torch.Tensor:
    """images: (B, C, h, w) -> (B, C + 2, h, w), the x and y of each pixel in [-1, 1] appended."""
    b, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype),
                            torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype), indexing="ij")
    return torch.cat([images, torch.stack([xs, ys]).expand(b, 2, h, w)], 1)


class VideoClassifier(nn.Module):
    """video: (N, 1, T, S, S) -> logits (N, classes), plus theta (N, 3, 4) and attention maps (N, T, h, w)."""

    def __init__(self, config: Config):
        super().__init__()
        # Border padding: a crop reaching past the clip (in space or time) repeats the edge, never blanks.
        self.stn = SpatialTransformer(3, 1, (config.frames, config.crop, config.crop), transform="translation_scale",
                                      padding_mode="border")
        c = config.channels
        # Coordinate channels in (CoordConv) and out: the features, and so the attended feature, say *where*.
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c // 2, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.soft_attention = SpatialSoftAttention(c + 2, config.hidden)
        d = config.model_dim
        self.embed = nn.Linear(c + 2 + config.hidden, d)
        self.frame_position = nn.Parameter(0.02 * torch.randn(config.frames, d))
        self.self_attention = MultiheadSelfAttention(d, config.heads, dropout=config.dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm2 = nn.LayerNorm(d)
        # The classifier reads every frame's token in order (not their mean): a motion is a change across frames.
        self.classifier = nn.Linear(config.frames * d, len(MOTIONS))

    def forward(self, video: torch.Tensor):
        n, _, t = video.shape[:3]
        cropped, theta = self.stn(video, return_theta=True)                  # (N, 1, T, crop, crop)
        frames = cropped.transpose(1, 2).flatten(0, 1)                       # (N*T, 1, crop, crop)
        maps = self.encoder(_with_coordinates(frames))                       # (N*T, C, h, w)
        maps = _with_coordinates(maps).unflatten(0, (n, t))                  # (N, T, C+2, h, w)
        attended, attention_maps, states = self.soft_attention(maps)
        tokens = self.embed(torch.cat([attended, states], -1)) + self.frame_position[:t]
        tokens = self.norm1(tokens + self.self_attention(tokens))
        tokens = self.norm2(tokens + self.mlp(tokens))
        return self.classifier(tokens.flatten(1)), theta, attention_maps


# ----------------------------------------------------------------------------- training


def _dtype(config: Config) -> torch.dtype:
    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {config.dtype!r}")
    return getattr(torch, config.dtype)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(config: Config, device: torch.device | None = None, log=print) -> nn.Module:
    """Train the model and return it (the DDP wrapper removed). Uses the process group if one is initialised."""
    rank, world = _distributed()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide over {world} processes")
    device = device or torch.device("cpu")
    dtype = _dtype(config)
    torch.manual_seed(config.seed)                      # the same initial weights on every rank
    model = VideoClassifier(config).to(device, dtype)
    trained = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    stn = [p for name, p in trained.named_parameters() if name.startswith("stn.")]
    rest = [p for name, p in trained.named_parameters() if not name.startswith("stn.")]
    rates = [config.lr * config.stn_lr_scale, config.lr]
    optimizer = torch.optim.AdamW([{"params": stn, "lr": rates[0]}, {"params": rest, "lr": rates[1]}],
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=rates, total_steps=config.steps, pct_start=0.1)
    local = config.batch_size // world
    start = time.perf_counter()
    running_loss = running_correct = 0.0
    for step in range(config.steps):
        videos, labels = batch_for_step(config, step)
        videos = videos[rank * local:(rank + 1) * local].to(device, dtype)
        labels = labels[rank * local:(rank + 1) * local].to(device)
        model.train()
        logits = model(videos)[0]
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running_loss += loss.item()
        running_correct += (logits.argmax(1) == labels).float().mean().item()
        if rank == 0 and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            seen = (step % config.log_every) + 1
            log(f"step {step + 1:5d}/{config.steps}  loss {running_loss / seen:.3f}  "
                f"train acc {running_correct / seen:.3f}  {time.perf_counter() - start:6.1f} s")
            running_loss = running_correct = 0.0
    return trained


@torch.no_grad()
def evaluate(model: nn.Module, config: Config, device: torch.device | None = None) -> float:
    """Test accuracy over the fixed test set, each rank taking a shard."""
    rank, world = _distributed()
    device = device or torch.device("cpu")
    videos, labels = test_set(config)
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(rank * 128, config.test_size, 128 * world):
        logits = model(videos[start:start + 128].to(device, _dtype(config)))[0]
        correct += (logits.argmax(1) == labels[start:start + 128].to(device)).sum()
    if world > 1:
        dist.all_reduce(correct)
    return correct.item() / config.test_size


# ----------------------------------------------------------------------------- figure


@torch.no_grad()
def save_figure(model: VideoClassifier, config: Config, path: str, examples: int = 4) -> None:
    """Per example: the input frames with the spatial transformer's crop drawn on them, the cropped
    frames, and the soft-attention map of each frame."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(12345)
    videos, labels = make_batch(config, examples, generator)
    parameter = next(model.parameters())
    videos_in = videos.to(parameter.device, parameter.dtype)
    model.eval()
    logits, theta, maps = model(videos_in)
    cropped = model.stn(videos_in).float().cpu()
    theta, maps, predicted = theta.float().cpu(), maps.float().cpu(), logits.argmax(1).cpu()
    t_count, s = config.frames, config.size
    fig, axes = plt.subplots(3 * examples, t_count, figsize=(1.3 * t_count, 1.35 * 3 * examples), squeeze=False)
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]], dtype=torch.float32)
    for e in range(examples):
        for k in range(t_count):
            # Output frame k sits at normalised time z_k; map its corners to input pixels (align_corners=False).
            z = -1 + (2 * k + 1) / t_count
            homogeneous = torch.cat([corners, torch.full((5, 1), z), torch.ones(5, 1)], 1)
            source = homogeneous @ theta[e].T
            px = ((source[:, :2] + 1) * s - 1) / 2
            frame = int(((source[0, 2] + 1) * t_count - 1) / 2 + 0.5)
            frame = min(max(frame, 0), t_count - 1)
            rows = [(videos[e, 0, frame], "gray"), (cropped[e, 0, k], "gray"), (maps[e, k], "viridis")]
            for r, (image, cmap) in enumerate(rows):
                ax = axes[3 * e + r, k]
                ax.imshow(image.numpy(), cmap=cmap)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[3 * e, k].plot(px[:, 0].numpy(), px[:, 1].numpy(), color="red", linewidth=1)
            axes[3 * e, k].set_xlim(-0.5, s - 0.5)
            axes[3 * e, k].set_ylim(s - 0.5, -0.5)
        axes[3 * e, 0].set_ylabel(f"{MOTIONS[labels[e]]}\n→ {MOTIONS[predicted[e]]}", fontsize=7)
        axes[3 * e + 1, 0].set_ylabel("crop", fontsize=7)
        axes[3 * e + 2, 0].set_ylabel("attention", fontsize=7)
    fig.suptitle("3-D spatial transformer crop (red), sampled frames, soft attention per frame", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def _parse(argv=None) -> tuple[Config, argparse.Namespace]:
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = TINY if "--tiny" in argv else Config()  # explicit flags still override the tiny ones
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (the CI configuration)")
    parser.add_argument("--figure", default="action_recognition.png", help="where to save the PNG ('' for none)")
    parser.add_argument("--save", default="", help="save the trained weights (state_dict) to this path")
    args = parser.parse_args(argv)
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}), args


def main(argv=None) -> float:
    config, args = _parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))   # share the cores between the ranks
    rank = dist.get_rank() if world > 1 else 0
    if rank == 0:
        print(f"{world} process(es) on {device.type}; {config}", flush=True)
    start = time.perf_counter()
    model = train(config, device, log=lambda line: print(line, flush=True))
    accuracy = evaluate(model, config, device)
    if rank == 0:
        print(f"test accuracy {accuracy:.3f} on {config.test_size} clips; "
              f"{time.perf_counter() - start:.1f} s in all", flush=True)
        if args.save:
            torch.save(model.state_dict(), args.save)
        if args.figure:
            save_figure(model, config, args.figure)
            print(f"saved {args.figure}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    from torchrun_exit import run_as_script  # examples/ is the script's directory: on sys.path

    run_as_script(main)
