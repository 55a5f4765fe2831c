"""Where a trial computes, checked on a CPU machine: Ray with declared (fake) GPUs shows what
`gpus_per_trial` gives an actor, and a checkpoint is read onto the CPU whatever device the trainer uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from labfleet.algorithms.base import held_gpus, resolve_device
from labfleet.algorithms.generative.base import collective_backend

FAKE_GPUS = """
import json, logging, os, ray
os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"  # what a GPU node's environment holds; Ray 2.60 passes it on
ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level=logging.WARNING)
from labfleet.algorithms.base import held_gpus, resolve_device

@ray.remote
def where(requested):
    held = held_gpus()
    try:
        device = resolve_device(requested, held)
    except RuntimeError as exc:
        device = "refused: " + str(exc)
    return {"held": held, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device}

out = {}
for gpus, requested in ((0, "auto"), (0, "cuda"), (0.5, "auto"), (1, "auto")):
    out[f"{gpus}-{requested}"] = ray.get(where.options(num_gpus=gpus).remote(requested))
out["two-halves"] = ray.get([where.options(num_gpus=0.5).remote("auto") for _ in range(2)])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_gpus_per_trial_decides_what_an_actor_sees():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", FAKE_GPUS], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # no GPU reserved: none visible, whatever the node's environment said, and `auto` is the CPU
    assert seen["0-auto"] == {"held": [], "visible": "", "device": "cpu"}
    assert seen["0-cuda"]["device"].startswith("refused:") and "gpus_per_trial" in seen["0-cuda"]["device"]
    # a GPU reserved: Ray names it (this machine has no CUDA, so torch still computes on the CPU)
    assert len(seen["0.5-auto"]["held"]) == 1 and seen["0.5-auto"]["visible"] == seen["0.5-auto"]["held"][0]
    assert len(seen["1-auto"]["held"]) == 1 and seen["1-auto"]["device"] == "cpu"
    assert all(len(s["held"]) == 1 for s in seen["two-halves"])


def test_outside_an_actor_torch_decides_and_collectives_fit_the_gpus():
    assert held_gpus() is None
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")
    assert resolve_device("auto", []) == "cpu"
    assert collective_backend("cpu", 0, 2) == "gloo"
    assert collective_backend("cuda", 2, 2) == "nccl"  # a GPU each
    assert collective_backend("cuda", 1, 2) == "gloo"  # two ranks on one GPU: NCCL would refuse them


def test_a_checkpoint_is_read_onto_the_cpu():
    """`restore_bytes` reads through `load_checkpoint` (map_location cpu): a generator's state must be a CPU
    byte tensor and array-like state comes back through `.numpy()`, so a restore on CUDA needs this."""
    import io

    import torch

    from labfleet.algorithms.base import load_checkpoint

    buffer = io.BytesIO()
    torch.save({"gen": torch.Generator().get_state(), "order": torch.arange(3)}, buffer)
    state = load_checkpoint(buffer.getvalue())
    assert state["gen"].device.type == "cpu" and state["order"].numpy().tolist() == [0, 1, 2]
    torch.Generator().set_state(state["gen"])


def test_the_gpu_check_lists_its_checks_without_a_gpu():
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for check in ("vae-bf16", "gan-fp32", "restore", "ranks-one-gpu", "cpu-vs-gpu"):
        assert check in done.stdout
