"""The GPU check: one short run on a machine with a CUDA GPU, of the CUDA paths a CPU machine cannot run.

    python benchmarks/gpu_check.py --dry-run     # what it would run; exits 0 on any machine
    python benchmarks/gpu_check.py --out DIR     # run it (about 3 minutes on one H100), DIR/gpu_check.md

A lent GPU machine has torch with CUDA but may lack labfleet's other dependencies and reaches no package
index. The generative trainers need only pydantic and PyYAML beside torch and numpy (Ray only for data
parallelism across actors), so `benchmarks/gpu_wheels.sh` downloads those wheels into `.gpu-wheels/`
beforehand, and the run installs them from there:

    pip install -q --no-index --find-links .gpu-wheels pydantic pyyaml
    PYTHONPATH=platform python benchmarks/gpu_check.py --out "$OUT"

Every check builds real trainers on `cuda` and reports pass or fail, with a timing; one failing check does
not stop the others. Data: synthetic 28x28 images (class-dependent rectangles, 4000 train, 1000 test), so
that nothing is downloaded and the image metrics have labels to train their classifier on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

CHECKS: list[tuple[str, str]] = [
    ("device", "torch sees CUDA; device name, capability, torch and CUDA versions"),
    ("vae-fp32", "conv VAE (discretised logistic) 300 steps on cuda, float32: finite, neg_elbo falls, images/s"),
    ("vae-bf16", "the same under bf16 autocast: finite, within 5 % of float32's neg_elbo, images/s"),
    ("gan-fp32", "DCGAN (BatchNorm G, spectral-norm D, hinge, EMA) 300 steps on cuda: finite, eval/fd falls"),
    ("gan-bf16", "the same under bf16 autocast: finite losses and metrics"),
    ("restore", "a cuda trainer (with dropout) restored from its checkpoint goes on bit for bit; a CPU checkpoint "
                "restores on cuda and a cuda checkpoint on the CPU"),
    ("ranks-one-gpu", "two processes on one GPU average CUDA gradients with gloo (NCCL refuses that)"),
    ("ranks-two-gpus", "with two or more GPUs: two processes, one GPU each, all-reduce with NCCL"),
    ("cpu-vs-gpu", "VAE steps per second on cuda against the CPU (same spec, 100 steps each)"),
]


def synthetic_images(directory: Path, seed: int = 0) -> Path:
    """Class k: a filled rectangle whose size depends on k, at a random place, with noise; uint8 (n, 28, 28)."""
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        x = rng.integers(0, 30, (n, 28, 28)).astype(np.int64)
        for i, k in enumerate(labels):
            h, w = 4 + k, 14 - k
            top, left = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
            x[i, top:top + h, left:left + w] += 200
        return np.clip(x, 0, 255).astype(np.uint8), labels

    x_train, y_train = draw(4000)
    x_test, y_test = draw(1000)
    file = directory / "shapes.npz"
    np.savez(file, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return file


def spec(algorithm: str, data: Path, overrides: dict[str, Any], iterations: int = 300) -> Any:
    from labfleet.spec.models import ExperimentSpec

    hparams: dict[str, Any] = {"architecture": "conv", "channels": [32, 64], "batch_size": 128, "image_every": 0}
    if algorithm == "gan":
        hparams.update({"batch_norm": True, "spectral_norm": True, "loss": "hinge", "ema": 0.99, "latent_dim": 64,
                        "learning_rate": 2e-4, "optimizer": {"type": "adam", "betas": [0.5, 0.999]}})
    else:
        hparams.update({"latent_dim": 32, "elbo_samples": 2})
    hparams.update(overrides)
    return ExperimentSpec.model_validate({
        "name": f"gpu-{algorithm}", "algorithm": algorithm, "dataset": "images", "seeds": [0],
        "dataset_kwargs": {"path": str(data), "n_valid": 500}, "budget": {"iterations": iterations},
        "hparams": hparams, "device": DEVICE, "resources": {"gpus_per_trial": 1 if DEVICE == "cuda" else 0}})


def build(algorithm: str, data: Path, overrides: dict[str, Any], device: str | None = None, seed: int = 0,
          iterations: int = 300) -> Any:
    from labfleet.algorithms import registry

    return registry.get(algorithm).trainer(spec(algorithm, data, overrides, iterations), seed, device or DEVICE)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train(trainer: Any) -> tuple[float, float]:
    """Train to the budget; (seconds, images per second)."""
    sync(trainer.device.type)
    started = time.perf_counter()
    while not trainer.done:
        trainer.train_iteration()
    sync(trainer.device.type)
    seconds = time.perf_counter() - started
    return seconds, trainer.steps * trainer.hp.batch_size / seconds


def finite(values: dict[str, float]) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    assert not bad, f"not finite: {bad}"


def check_device(_: Path) -> str:
    import torch

    if DEVICE == "cpu":
        return f"SKIP: --device cpu (a rehearsal of the script); torch {torch.__version__}"
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} x {props.name}, capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")


def trained(algorithm: str, data: Path, bf16: bool, metric: str) -> tuple[float, dict[str, float], Any, float, float]:
    """(metric before, final evaluation, trainer, seconds, images/s) of a run to the budget; finite checked."""
    trainer = build(algorithm, data, {"bf16": bf16})
    before = trainer.evaluate()[metric]
    seconds, rate = train(trainer)
    after = trainer.evaluate()
    finite(after)
    return before, after, trainer, seconds, rate


def check_vae(data: Path, bf16: bool) -> str:
    before, after, trainer, seconds, rate = trained("vae", data, bf16, "eval/neg_elbo")
    assert after["eval/neg_elbo"] < 0.9 * before, f"neg_elbo {before:.1f} -> {after['eval/neg_elbo']:.1f}"
    RESULTS[f"vae-{'bf16' if bf16 else 'fp32'}"] = after["eval/neg_elbo"]
    if bf16 and "vae-fp32" in RESULTS:
        gap = abs(after["eval/neg_elbo"] / RESULTS["vae-fp32"] - 1)
        assert gap < 0.05, f"bf16 neg_elbo {after['eval/neg_elbo']:.1f} against float32's {RESULTS['vae-fp32']:.1f}"
    return (f"neg_elbo {before:.1f} -> {after['eval/neg_elbo']:.1f} nats, {after['eval/bits_per_dim']:.3f} bits/dim; "
            f"{trainer.steps} steps in {seconds:.1f} s, {rate:,.0f} images/s")


def check_gan(data: Path, bf16: bool) -> str:
    before, after, _, seconds, rate = trained("gan", data, bf16, "eval/fd")
    if not bf16:
        assert after["eval/fd"] < before, f"eval/fd {before:.1f} -> {after['eval/fd']:.1f}"
    return (f"eval/fd {before:.1f} -> {after['eval/fd']:.1f}, kid {after['eval/kid']:.2f}, precision "
            f"{after['eval/precision']:.2f}, recall {after['eval/recall']:.2f}; {seconds:.1f} s, {rate:,.0f} images/s")


def check_restore(data: Path) -> str:
    from labfleet import testing

    over = {"dropout": 0.1}
    testing.check_exact_resume(lambda seed: build("vae", data, over, seed=seed, iterations=12), iterations=5)
    on_cpu = build("vae", data, over, device="cpu", iterations=12)
    for _ in range(5):
        on_cpu.train_iteration()
    on_gpu = build("vae", data, over, iterations=12)
    on_gpu.restore_bytes(on_cpu.checkpoint_bytes())
    assert on_gpu.torch_gen.device.type == DEVICE
    np.testing.assert_allclose(on_gpu.probe(), on_cpu.probe(), rtol=1e-3, atol=1e-2)
    back = build("vae", data, over, device="cpu", iterations=12)
    back.restore_bytes(on_gpu.checkpoint_bytes())
    np.testing.assert_allclose(back.probe(), on_cpu.probe(), rtol=1e-3, atol=1e-2)
    on_gpu.train_iteration()
    sync(DEVICE)
    return f"exact resume on {DEVICE}; cpu -> {DEVICE} -> cpu checkpoints restore (probes agree to float tolerance)"


def _ranks(rank: int, world: int, backend: str, port: int, devices: list[int], out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(devices[rank])
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tensor = torch.full((1000,), float(rank + 1), device=f"cuda:{devices[rank]}")
    dist.all_reduce(tensor)
    Path(out, f"rank{rank}").write_text(str(float(tensor[0])))
    dist.destroy_process_group()


def check_ranks(_: Path, two_gpus: bool) -> str:
    import socket

    import torch
    import torch.multiprocessing as mp

    from labfleet.algorithms.generative.base import collective_backend

    if DEVICE == "cpu" or (two_gpus and torch.cuda.device_count() < 2):
        return "SKIP: needs CUDA" if DEVICE == "cpu" else "SKIP: one GPU only"
    backend = collective_backend("cuda", 2 if two_gpus else 1, 2)
    assert backend == ("nccl" if two_gpus else "gloo"), backend
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ranks, args=(2, backend, port, [0, 1] if two_gpus else [0, 0], out), nprocs=2, join=True)
        sums = [float(Path(out, f"rank{r}").read_text()) for r in range(2)]
    assert sums == [3.0, 3.0], sums
    return f"{backend}: both ranks hold the sum"


def check_cpu_vs_gpu(data: Path) -> str:
    import torch

    if DEVICE == "cpu":
        return "SKIP: needs CUDA"
    rates = {}
    for device in ("cpu", "cuda"):
        trainer = build("vae", data, {}, device=device, iterations=100)
        seconds, _ = train(trainer)
        rates[device] = trainer.steps / seconds
    return (f"cpu {rates['cpu']:.1f} steps/s ({torch.get_num_threads()} threads), cuda {rates['cuda']:.1f} steps/s: "
            f"{rates['cuda'] / rates['cpu']:.1f}x")


DEVICE = "cuda"
RESULTS: dict[str, float] = {}
RUNNERS: dict[str, Callable[[Path], str]] = {
    "device": check_device,
    "vae-fp32": lambda d: check_vae(d, False),
    "vae-bf16": lambda d: check_vae(d, True),
    "gan-fp32": lambda d: check_gan(d, False),
    "gan-bf16": lambda d: check_gan(d, True),
    "restore": check_restore,
    "ranks-one-gpu": lambda d: check_ranks(d, False),
    "ranks-two-gpus": lambda d: check_ranks(d, True),
    "cpu-vs-gpu": check_cpu_vs_gpu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit 0")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")),
                        help="where gpu_check.md and gpu_check.json go")
    parser.add_argument("--only", help="comma-separated check names")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: rehearse the script on a machine without a GPU (the CUDA-only checks skip)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    chosen = [name for name, _ in CHECKS if not args.only or name in args.only.split(",")]
    if args.dry_run:
        print("The GPU check would run, on cuda:")
        for name, what in CHECKS:
            if name in chosen:
                print(f"  {name:15s} {what}")
        try:
            import torch

            seen = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        except ImportError:
            seen = "no torch"
        print(f"This machine: {seen}.")
        return 0
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("torch sees no CUDA device: there is nothing to check here (--dry-run lists the checks)")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LABFLEET_CACHE", str(args.out / "cache"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = synthetic_images(Path(scratch))
        for name in chosen:
            started = time.perf_counter()
            try:
                detail, status = RUNNERS[name](data), "pass"
                if detail.startswith("SKIP"):
                    status, detail = "skip", detail[6:]
            except Exception as exc:  # noqa: BLE001 (each check reports its own failure; the rest go on)
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            seconds = time.perf_counter() - started
            rows.append({"check": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
            print(f"{name:15s} {status:5s} {seconds:6.1f} s  {detail}", flush=True)
    table = ["| check | result | seconds | detail |", "|---|---|---|---|"]
    table += [f"| {r['check']} | {r['status']} | {r['seconds']} | {r['detail']} |" for r in rows]
    (args.out / "gpu_check.md").write_text("\n".join(table) + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["status"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
