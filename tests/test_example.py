"""examples/action_recognition.py: the synthetic motions are what their labels say, a tiny training
run works end to end (figure included), and a 2-process DDP run takes the same steps as one process."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "action_recognition.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("action_recognition", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ar = _load_example()


def _actor_tracks(videos: torch.Tensor):
    """Centroid (N, T, 2) and area (N, T) of the bright actor (the distractor and noise stay below 0.75)."""
    bright = (videos[:, 0] > 0.75).float()                                # (N, T, S, S)
    s = bright.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    area = bright.sum((-2, -1))
    centroid = torch.stack([(bright * xs).sum((-2, -1)), (bright * ys).sum((-2, -1))], -1) / area[..., None]
    return centroid, area


def test_every_motion_moves_as_its_label_says():
    config = ar.Config(noise=0.0)
    videos, labels = ar.make_batch(config, 256, torch.Generator().manual_seed(0))
    assert videos.shape == (256, 1, config.frames, config.size, config.size) and videos.dtype == torch.float32
    assert set(labels.tolist()) == set(range(len(ar.MOTIONS)))
    centroid, area = _actor_tracks(videos)
    displacement = centroid[:, -1] - centroid[:, 0]
    velocity = centroid[:, 1:] - centroid[:, :-1]
    turning = (velocity[:, :-1, 0] * velocity[:, 1:, 1] - velocity[:, :-1, 1] * velocity[:, 1:, 0]).mean(1)
    growth = area[:, -1] - area[:, 0]
    for index, motion in enumerate(ar.MOTIONS):
        chosen = labels == index
        dx, dy = displacement[chosen, 0], displacement[chosen, 1]
        checks = {
            "right": dx > 4, "left": dx < -4, "down": dy > 4, "up": dy < -4,
            "clockwise": turning[chosen] > 0, "anticlockwise": turning[chosen] < 0,  # y points down
            "grow": growth[chosen] > 0, "shrink": growth[chosen] < 0,
        }
        assert checks[motion].all(), motion


def test_batches_are_reproducible_per_step():
    config = ar.TINY
    first, labels = ar.batch_for_step(config, 5)
    again, labels_again = ar.batch_for_step(config, 5)
    assert torch.equal(first, again) and torch.equal(labels, labels_again)
    assert not torch.equal(first, ar.batch_for_step(config, 6)[0])


def test_model_shapes_and_a_tiny_training_run():
    config = ar.TINY
    torch.manual_seed(config.seed)
    initial = ar.VideoClassifier(config).state_dict()
    logs = []
    model = ar.train(config, log=logs.append)
    assert len(logs) == config.steps and all("loss" in line for line in logs)
    changed = max((model.state_dict()[k] - v).abs().max().item() for k, v in initial.items())
    assert changed > 1e-3
    videos, _ = ar.batch_for_step(config, 0)
    logits, theta, maps = model(videos)
    assert logits.shape == (config.batch_size, len(ar.MOTIONS))
    assert theta.shape == (config.batch_size, 3, 4)
    assert maps.shape[:2] == (config.batch_size, config.frames)
    assert 0.0 <= ar.evaluate(model, config) <= 1.0


def test_main_runs_and_saves_the_figure_and_weights(tmp_path, capsys):
    figure, weights = tmp_path / "fig.png", tmp_path / "weights.pt"
    accuracy = ar.main(["--tiny", "--figure", str(figure), "--save", str(weights)])
    assert 0.0 <= accuracy <= 1.0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(torch.load(weights)) == set(ar.VideoClassifier(ar.TINY).state_dict())
    assert "test accuracy" in capsys.readouterr().out


def test_two_process_ddp_takes_the_same_steps_as_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): each rank trains on half of every global batch and
    DDP averages the gradients, so the weights equal a single process's on the whole batches.

    DDP guarantees the averaged gradient, not its rounding: the two runs sum in different orders. In
    float32 that rounding noise (~1e-9) is amplified by AdamW on parameters whose true gradient is zero
    (the key bias of attention: softmax ignores a per-row constant), where it is comparable to Adam's
    eps, so the weights can differ by ~5e-5. In float64 the noise is ~1e-17, far below eps, and the two
    runs must agree to ~1e-12 (three steps of size ~3e-3)."""
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    weights = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
         "--tiny", "--dtype", "float64", "--figure", "", "--save", str(weights)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    distributed = torch.load(weights)

    config = dataclasses.replace(ar.TINY, dtype="float64")
    single = ar.train(config, log=lambda line: None).state_dict()
    torch.manual_seed(config.seed)
    initial = ar.VideoClassifier(config).double().state_dict()
    for name, value in single.items():
        assert distributed[name].dtype == torch.float64, name
        torch.testing.assert_close(distributed[name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert max((single[k] - v).abs().max().item() for k, v in initial.items()) > 1e-3  # the steps moved them


def test_float64_training_gives_float64_weights():
    config = dataclasses.replace(ar.TINY, dtype="float64", steps=1)
    model = ar.train(config, log=lambda line: None)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert 0.0 <= ar.evaluate(model, config) <= 1.0
    with pytest.raises(ValueError, match="dtype"):
        ar.train(dataclasses.replace(ar.TINY, dtype="float16"), log=lambda line: None)
