"""What the VAE and the GAN share: data, networks, budgets, early stopping, images, data parallelism.

One `train_iteration` is one optimiser step on one minibatch (for the GAN: its discriminator steps and
one generator step). The budget is `epochs` (passes over the train split; progress counts whole epochs)
or `iterations` (optimiser steps); the metric step is always the optimiser step.

Early stopping (`hparams.early_stopping: {patience: P}`): at every evaluation the model's validation
metric (`valid/...`, lower is better) is compared with the best so far; the best parameters are kept, and
after P evaluations without an improvement of at least `min_delta` the trial stops. The final evaluation
then uses the best parameters and reports `early_stopping/best_step`.

Data parallelism (`resources.data_parallel: N`): this trainer is rank 0; it starts N - 1 `DataParallelRank`
Ray actors in the trial's placement group, each with the same model (built from rank 0's checkpoint), its
own slice of every minibatch (the ranks partition each epoch) and its own noise, joined in a
`torch.distributed` process group (NCCL where each rank holds a GPU of its own; gloo on the CPU and where
ranks share a GPU). Every optimiser step all-reduces the gradients (their mean over ranks) before clipping,
so the parameters stay identical on every rank. Each rank's slice is `batch_size / N` examples, so the
ranks together draw the minibatch one worker would.
Only rank 0 evaluates, reports and checkpoints.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from datetime import timedelta
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from labfleet import metrics as M
from labfleet.algorithms.base import Trainer, rng_state, set_rng_state
from labfleet.algorithms.generative import metrics as GM
from labfleet.algorithms.optim import OptimHParams, ScheduledOptimizer
from labfleet.algorithms.sizes import BatchSize, Width
from labfleet.data import datasets
from labfleet.seeding import derive_seed
from labfleet.spec.models import ExperimentSpec

# How long a rank waits for the others in a collective (torch's default is 30 min): a rank that hangs
# without dying fails its trial after this, and the driver retries it from its checkpoint.
DIST_TIMEOUT = timedelta(minutes=5)


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patience: PositiveInt = Field(5, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="The least decrease of the validation metric that counts.")


class EarlyStopper:
    """Early stopping on a validation metric, lower being better, with its own state: the best value, the step
    it was reached at and the parameters then (`snapshot()` at each improvement), the evaluations since, and
    whether it stopped. Without a config (`early_stopping: null`) it only watches."""

    def __init__(self, config: EarlyStopping | None):
        self.config = config
        self.best_value = math.inf
        self.best_step = 0
        self.best_state: dict[str, Any] | None = None
        self.bad = 0  # evaluations without improvement since the best
        self.stopped = False

    def observe(self, value: float, step: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        if self.config is None:
            return
        if value < self.best_value - self.config.min_delta:
            self.best_value, self.best_step, self.bad = value, step, 0
            self.best_state = snapshot()
        else:
            self.bad += 1
            if self.bad >= self.config.patience:
                self.stopped = True

    def metrics(self) -> dict[str, float]:
        if self.config is None:
            return {}
        return {M.EARLY_STOP_BEST_STEP: float(self.best_step), M.EARLY_STOP_STOPPED: float(self.stopped)}

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "bad": self.bad, "stopped": self.stopped,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_step = float(state["best_value"]), int(state["best_step"])
        self.bad, self.stopped = int(state["bad"]), bool(state["stopped"])
        self.best_state = state["best_state"]


class GenerativeHParams(OptimHParams):
    architecture: Literal["mlp", "conv"] = Field("mlp", description="mlp, or conv for image datasets.")
    hidden: list[Width] = Field(default_factory=lambda: [256, 256], description="MLP layer widths.")
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64],
                                        description="Conv channels; each layer halves the image size.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer (a regulariser).")
    batch_size: BatchSize = 128
    max_grad_norm: PositiveFloat | None = Field(None, description="Clip the global gradient norm; null: off.")
    early_stopping: EarlyStopping | None = Field(None, description="Stop on the validation metric; null: off.")
    image_every: NonNegativeInt = Field(2, description="Log sample images every this many evaluations "
                                        "(and at the end); 0: never.")
    dataset_size: PositiveInt | None = Field(None, description="Train points drawn from ring8/grid25.")
    bf16: bool = Field(False, description="bfloat16 autocast for the training forward passes on CUDA (no effect "
                       "on CPU); parameters, optimiser state and evaluation stay float32.")


def mlp(sizes: list[int], activation: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0,
        last_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or last_activation:
            layers.append(activation())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """(n, C, H, W) -> (n, out): stride-2 3x3 convolutions (each halves H and W) with LeakyReLU, then a
    linear layer; spectral normalisation of every layer when asked (Miyato et al. 2018, a discriminator's)."""

    def __init__(self, shape: tuple[int, ...], channels: list[int], out: int, dropout: float = 0.0,
                 spectral_norm: bool = False):
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda module: module)
        layers: list[nn.Module] = []
        c_in = shape[0]
        for c in channels:
            layers += [norm(nn.Conv2d(c_in, c, 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            c_in = c
        self.body = nn.Sequential(*layers, nn.Flatten())
        scale = 2 ** len(channels)
        self.head = norm(nn.Linear(c_in * (shape[1] // scale) * (shape[2] // scale), out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ConvDecoder(nn.Module):
    """(n, in) -> (n, C, H, W): a linear layer, then stride-2 transposed convolutions (each doubles H, W),
    with BatchNorm after each when asked (DCGAN's generator)."""

    def __init__(self, n_in: int, shape: tuple[int, ...], channels: list[int], batch_norm: bool = False):
        super().__init__()
        scale = 2 ** len(channels)
        self.start = (channels[-1], shape[1] // scale, shape[2] // scale)
        width = int(np.prod(self.start))
        self.head = nn.Sequential(nn.Linear(n_in, width), *([nn.BatchNorm1d(width)] if batch_norm else []), nn.ReLU())
        layers: list[nn.Module] = []
        reversed_channels = list(reversed(channels))
        for c_in, c_out in zip(reversed_channels, [*reversed_channels[1:], reversed_channels[-1]], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                       *([nn.BatchNorm2d(c_out)] if batch_norm else []), nn.ReLU()]
        layers.append(nn.Conv2d(reversed_channels[-1], shape[0], 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.head(z).view(-1, *self.start))


class ResidualBlock(nn.Module):
    """x + f(x) with f two 3x3 convolutions (GroupNorm, SiLU); `stride: 2` halves H and W, with a strided 1x1
    convolution on the shortcut (also where the channels change)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(min(8, c_in), c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class ResNetEncoder(nn.Module):
    """(n, C, H, W) -> (n, out): a 3x3 stem, one stride-2 residual block per entry of `channels` (each
    halves H and W), then a linear layer."""

    def __init__(self, shape: tuple[int, ...], channels: list[int], out: int):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(shape[0], channels[0], 3, padding=1)]
        c_in = channels[0]
        for c in channels:
            blocks.append(ResidualBlock(c_in, c, stride=2))
            c_in = c
        self.body = nn.Sequential(*blocks, nn.SiLU(), nn.Flatten())
        scale = 2 ** len(channels)
        self.head = nn.Linear(c_in * (shape[1] // scale) * (shape[2] // scale), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CheapDecoder(nn.Module):
    """(n, in) -> (n, C, H, W) for the ResNet VAE: a linear layer, then per level a nearest-neighbour 2x
    upsampling and one 3x3 convolution with SiLU (a cheap head: the encoder carries the capacity), then a
    3x3 convolution to the output channels."""

    def __init__(self, n_in: int, shape: tuple[int, ...], channels: list[int]):
        super().__init__()
        scale = 2 ** len(channels)
        self.start = (channels[-1], shape[1] // scale, shape[2] // scale)
        self.head = nn.Sequential(nn.Linear(n_in, int(np.prod(self.start))), nn.SiLU())
        layers: list[nn.Module] = []
        reversed_channels = list(reversed(channels))
        for c_in, c_out in zip(reversed_channels, [*reversed_channels[1:], reversed_channels[-1]], strict=True):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(reversed_channels[-1], shape[0], 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.head(z).view(-1, *self.start))


def check_architecture(hp: GenerativeHParams, data: datasets.Dataset) -> None:
    if hp.architecture in ("conv", "resnet"):
        if not data.is_image:
            raise ValueError(f"architecture {hp.architecture} needs an image dataset; {data.name} is points (use mlp)")
        scale = 2 ** len(hp.channels)
        if data.shape[1] % scale or data.shape[2] % scale:
            raise ValueError(f"{len(hp.channels)} conv layers halve {data.shape[1]}x{data.shape[2]} images "
                             f"{len(hp.channels)} times: the size must be a multiple of {scale}")


def latent_path(starts: torch.Tensor, ends: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """(n * steps, d): for each row pair, `steps` evenly spaced points from start to end (interpolation grids)."""
    weights = torch.linspace(0, 1, steps, device=starts.device)[None, :, None]
    return (starts[:, None] * (1 - weights) + ends[:, None] * weights).reshape(-1, starts.shape[-1])


def _ray() -> Any:
    """Ray, imported where data parallelism needs it: a trainer on one device runs without it."""
    import ray

    return ray


def collective_backend(device_type: str, gpus_per_trial: float, world: int) -> str:
    """NCCL where every rank holds a GPU of its own; gloo on the CPU, and where ranks share a GPU (NCCL
    refuses two ranks of one communicator on one device; gloo all-reduces CUDA tensors too)."""
    return "nccl" if device_type == "cuda" and gpus_per_trial / world >= 1 else "gloo"


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class GenerativeTrainer(Trainer):
    """Subclasses build `self.models` (name -> module) and `self.optimizers` (name -> ScheduledOptimizer)
    in `build()`, and implement `step(batch)`, `validation_metric()`, `test_metrics()`, `sample_images()`."""

    hparams_model: ClassVar[type[BaseModel]] = GenerativeHParams
    hp: GenerativeHParams

    def __init__(self, spec: ExperimentSpec, seed: int, device: str = "cpu", rank: int = 0):
        super().__init__(spec, seed, device)
        self.validation_name = "valid/loss"  # set by build()
        assert spec.dataset is not None
        self.rank = rank
        self.world = spec.resources.data_parallel
        kwargs = dict(spec.dataset_kwargs)
        if self.hp.dataset_size is not None and spec.dataset in ("ring8", "grid25"):
            kwargs["n_train"] = self.hp.dataset_size
        self.data = datasets.load(spec.dataset, seed=seed, **kwargs)
        check_architecture(self.hp, self.data)
        if self.device.type == "cuda":  # fixed shapes: let cuDNN pick its fastest convolution once
            torch.backends.cudnn.benchmark = True
        # 8-bit images stay uint8 on the device (a quarter of float32's memory) and become float per batch
        self.train_x = torch.as_tensor(self.data.train, device=self.device)
        self.valid_x = torch.as_tensor(self.data.valid, device=self.device).float()
        self.test_x = torch.as_tensor(self.data.test, device=self.device).float()
        self.rng = np.random.default_rng(derive_seed(seed, "batches", 0))  # one stream for every rank
        self.batch = max(1, self.hp.batch_size // self.world)
        self.steps_per_epoch = math.ceil(len(self.train_x) / self.hp.batch_size)
        self._order = self.rng.permutation(len(self.train_x))
        self._cursor = 0
        self.steps = 0
        self.evaluations = 0
        self.early = EarlyStopper(self.hp.early_stopping)
        self._restored_best = False
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, ScheduledOptimizer] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "init"))
            self.build()
        self.torch_gen = torch.Generator(device=self.device).manual_seed(derive_seed(seed, "noise", rank))
        # Dropout draws from torch's global generator: the trainer keeps that generator's state as its own,
        # seeded here and checkpointed, and sets it around each step (`own_global_rng`)
        self.dropout_rng: list[torch.Tensor] | None = None
        if self.hp.dropout:
            with torch.random.fork_rng(devices=self._cuda()):
                torch.manual_seed(derive_seed(seed, "dropout", rank))
                self.dropout_rng = self._global_rng()
        self._helpers: list[Any] = []
        self._classifier: Any = None
        self._group = False
        self._rank_states: list[dict[str, Any]] | None = None  # restored, for the helpers `_start_data_parallel` starts

    # --- for subclasses -------------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def validation_metric(self) -> float:
        raise NotImplementedError

    def test_metrics(self) -> dict[str, float]:
        raise NotImplementedError

    def sample_images(self) -> dict[str, bytes]:
        return {}

    # --- sample quality on 8-bit image datasets ------------------------------------------------------
    @property
    def has_image_metrics(self) -> bool:
        """FD, KID, precision and recall apply: 8-bit images with class labels (digits has metrics of its own)."""
        return self.data.is_image and self.data.levels == 255 and "train" in self.data.labels

    def image_quality(self, samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        """`GM.image_metrics` of samples against reference images (both in counts 0..255), in the features of
        the dataset's classifier, trained on the whole train split whatever `dataset_kwargs.limit` says."""
        if self._classifier is None:
            whole = self.data
            if self.spec.dataset_kwargs.get("limit") is not None:
                kwargs = {k: v for k, v in self.spec.dataset_kwargs.items() if k != "limit"}
                whole = datasets.load(self.data.name, seed=self.seed, **kwargs)
            self._classifier, _ = GM.feature_classifier(whole.train, whole.labels["train"])
        return GM.image_metrics(samples / 255.0, reference / 255.0, self._classifier)

    def autocast(self) -> Any:
        """bf16 autocast on CUDA when asked for; a no-op context otherwise."""
        enabled = self.hp.bf16 and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled) if enabled else nullcontext()

    def _cuda(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _global_rng(self) -> list[torch.Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in self._cuda())]

    @contextmanager
    def own_global_rng(self) -> Iterator[None]:
        """Inside: torch's global generators (CPU, and this trainer's GPU) hold this trainer's dropout
        stream; outside, they are as they were. Nothing to do without dropout."""
        if self.dropout_rng is None:
            yield
            return
        with torch.random.fork_rng(devices=self._cuda()):
            torch.set_rng_state(self.dropout_rng[0])
            for d, state in zip(self._cuda(), self.dropout_rng[1:], strict=True):
                torch.cuda.set_rng_state(state, d)
            yield
            self.dropout_rng = self._global_rng()

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the next minibatch, in training mode, with this trainer's own randomness."""
        for model in self.models.values():
            model.train()
        with self.own_global_rng(), self.autocast():
            return self.step(self.next_batch())

    # --- data ----------------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """This rank's part of the next minibatch. Every rank walks the same permutations of the train split
        (one stream, seeded from the seed alone) and rank r takes the r-th of `world` consecutive slices, so
        the ranks partition each epoch and together draw the minibatch one worker would. With several
        ranks an epoch's last, incomplete minibatch is dropped, so that no rank is left without examples."""
        global_batch = self.batch * self.world
        if self._cursor >= len(self._order) or (self.world > 1 and self._cursor + global_batch > len(self._order)):
            self._order = self.rng.permutation(len(self.train_x))
            self._cursor = 0
        start = self._cursor + self.rank * self.batch
        index = self._order[start:start + self.batch]
        self._cursor += global_batch
        return self.train_x[torch.as_tensor(index, device=self.device)].float()

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Network input: count images scaled to [0, 1]; points as they are."""
        return x / self.data.levels if self.data.levels else x

    # --- the Trainer interface -------------------------------------------------------------------------
    @property
    def progress(self) -> int:
        if self.spec.budget.unit == "epochs":
            return self.steps // self.steps_per_epoch
        return self.steps

    @property
    def metric_step(self) -> int:
        return self.steps

    @property
    def done(self) -> bool:
        return self.early.stopped or self.progress >= self.spec.budget.total

    def budget_fraction(self) -> float:
        total = self.spec.budget.total * (self.steps_per_epoch if self.spec.budget.unit == "epochs" else 1)
        return self.steps / max(total, 1)

    def train_iteration(self) -> dict[str, float]:
        if self.world > 1 and self.rank == 0 and not self._helpers:
            self._start_data_parallel()
        pending = [h.train_iteration.remote() for h in self._helpers]
        try:
            logged = self.train_step()
        except RuntimeError:
            # A rank that died breaks the collective here (gloo: the connection closed); say that a rank was
            # lost (Ray's own error: the driver retries the seed from its checkpoint), not that training failed.
            if pending:
                _ray().get(pending, timeout=60)
            raise
        self.steps += 1
        if pending:
            _ray().get(pending)
        return logged

    def evaluate(self) -> dict[str, float]:
        for model in self.models.values():
            model.eval()
        out: dict[str, float] = {}
        with torch.no_grad():
            if not self.early.stopped and not self._restored_best:
                value = self.validation_metric()
                out[self.validation_name] = value
                self.early.observe(value, self.steps, self._model_state)
            if self.done and self.early.best_state is not None and not self._restored_best:
                self._load_models(self.early.best_state)  # the final evaluation uses the best parameters
                self._restored_best = True
            out.update(self.test_metrics())
        out.update(self.early.metrics())
        self.evaluations += 1
        return out

    def media(self) -> dict[str, bytes]:
        """Images to log at this evaluation (a time series: the file names carry the step)."""
        every = self.hp.image_every
        if not every or (self.evaluations % every and not self.done):
            return {}
        with torch.no_grad():
            return {f"{name}/step_{self.steps:08d}.png": data for name, data in self.sample_images().items()}

    def _model_state(self) -> dict[str, Any]:
        return {name: {k: v.detach().clone() for k, v in model.state_dict().items()}
                for name, model in self.models.items()}

    def _load_models(self, state: dict[str, Any]) -> None:
        for name, model in self.models.items():
            model.load_state_dict(state[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": self._model_state(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "steps": self.steps, "evaluations": self.evaluations, **self.sampling_state(),
            "early": self.early.state_dict(),
            # data parallelism: the other ranks' minibatch streams, so that a restore goes on exactly
            **({"ranks": ranks} if (ranks := self._helper_sampling_states()) is not None else {}),
        }

    def sampling_state(self) -> dict[str, Any]:
        """This rank's place in the shared minibatch stream, and its own noise and dropout streams."""
        return {"rng": rng_state(self.rng), "order": torch.as_tensor(self._order), "cursor": self._cursor,
                "torch_gen": self.torch_gen.get_state(), "dropout_rng": self.dropout_rng}

    def load_sampling_state(self, state: dict[str, Any]) -> None:
        set_rng_state(self.rng, state["rng"])
        self._order, self._cursor = state["order"].numpy(), int(state["cursor"])
        self.torch_gen.set_state(state["torch_gen"])
        saved = state.get("dropout_rng")
        if self.dropout_rng is not None and saved is not None and len(saved) == len(self.dropout_rng):
            self.dropout_rng = list(saved)

    def _helper_sampling_states(self) -> list[dict[str, Any]] | None:
        if self.world == 1 or self.rank != 0:
            return None
        if self._helpers:
            return _ray().get([h.sampling_state.remote() for h in self._helpers])
        return self._rank_states

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_models(state["models"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.steps, self.evaluations = int(state["steps"]), int(state["evaluations"])
        self.load_sampling_state(state)
        self.early.load_state_dict(state["early"])
        self._rank_states = state.get("ranks")
        # Helper ranks without their saved streams start fresh ones: reproducible, not exact.
        self.resume_exact = self.world == 1 or self.steps == 0 or self._rank_states is not None

    def probe(self) -> np.ndarray:
        """Decoded / generated samples from fixed latents."""
        for model in self.models.values():
            model.eval()
        with torch.no_grad():
            return self.generate(16, torch.Generator(device=self.device).manual_seed(1234)).cpu().numpy()

    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    # --- data parallelism ------------------------------------------------------------------------------
    def _start_data_parallel(self) -> None:
        import torch.distributed as dist
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        global RemoteDataParallelRank
        if RemoteDataParallelRank is None:
            RemoteDataParallelRank = _ray().remote(DataParallelRank)

        group = _ray().util.get_current_placement_group()
        address, port = _ray().util.get_node_ip_address(), free_port()
        res = self.spec.resources
        backend = collective_backend(self.device.type, res.gpus_per_trial, self.world)
        checkpoint = self.checkpoint_bytes()
        for rank in range(1, self.world):
            options: dict[str, Any] = {"num_cpus": res.cpus_per_trial,
                                       "num_gpus": res.gpus_per_trial / self.world}
            if group is not None and len(group.bundle_specs) > rank:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank)
            sampling = self._rank_states[rank - 1] if self._rank_states is not None else None
            self._helpers.append(RemoteDataParallelRank.options(**options).remote(
                self.spec.model_dump(mode="json"), self.seed, rank, checkpoint, sampling))
        self._rank_states = None
        init_method = f"tcp://{address}:{port}"
        joined = [h.join.remote(init_method, backend) for h in self._helpers]
        # A helper that dies before it joins would leave rank 0 waiting in `init_process_group` until the
        # group's timeout: rank 0 joins in a thread while it watches the helpers, and a dead one raises Ray's
        # own error (the driver retries the seed from its checkpoint; the stuck thread dies with the actor).
        failed: list[BaseException] = []

        def init() -> None:
            try:
                dist.init_process_group(backend, init_method=init_method, rank=0, world_size=self.world,
                                        timeout=DIST_TIMEOUT)
            except BaseException as exc:  # noqa: BLE001 (handed to the caller below)
                failed.append(exc)

        joining = threading.Thread(target=init, name="labfleet-dp-init", daemon=True)
        joining.start()
        while joining.is_alive():
            done, _ = _ray().wait(joined, num_returns=len(joined), timeout=0.2, fetch_local=False)
            for ref in done:
                _ray().get(ref)  # finished already: only a helper that died (or raised) gets here
            joining.join(0.05)
        if failed:
            _ray().get(joined, timeout=60)  # a helper that died: say so
            raise failed[0]
        self._group = True
        try:
            self.attach_process_group()  # its broadcast meets the helpers' inside their `join`
        except RuntimeError:
            _ray().get(joined, timeout=60)
            raise
        _ray().get(joined)

    def attach_process_group(self) -> None:
        """Average gradients over ranks at every optimiser step; start from rank 0's parameters."""
        import torch.distributed as dist

        world = dist.get_world_size()

        def average(params: list[nn.Parameter]) -> None:
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

        for model in self.models.values():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        for opt in self.optimizers.values():
            opt.grad_hook = average

    def parameter_digest(self) -> list[np.ndarray]:
        return [p.detach().cpu().numpy().copy() for m in self.models.values() for p in m.parameters()]

    def helper_digests(self) -> list[list[np.ndarray]]:
        return _ray().get([h.parameter_digest.remote() for h in self._helpers])

    def close(self) -> None:
        if self._helpers:
            for helper in self._helpers:
                _ray().kill(helper)
            self._helpers = []
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False


class DataParallelRank:
    """Rank r > 0 of a data-parallel trial: the same trainer, its own slice of every minibatch, no reporting."""

    def __init__(self, spec: dict[str, Any], seed: int, rank: int, checkpoint: bytes,
                 sampling: dict[str, Any] | None = None):
        from labfleet.algorithms import registry
        from labfleet.algorithms.base import held_gpus, load_checkpoint, resolve_device

        parsed = ExperimentSpec.model_validate(spec)
        torch.set_num_threads(max(1, int(parsed.resources.cpus_per_trial)))
        device = resolve_device(parsed.device, held_gpus())
        trainer = registry.get(parsed.algorithm).trainer(parsed, seed, device, rank=rank)  # type: ignore[call-arg]
        assert isinstance(trainer, GenerativeTrainer)
        self.trainer = trainer
        gen, dropout = self.trainer.torch_gen.get_state(), self.trainer.dropout_rng
        # rank 0's parameters, optimiser and minibatch stream (the ranks share it, each its own slice) ...
        self.trainer.load_state_dict(load_checkpoint(checkpoint))
        self.trainer.torch_gen.set_state(gen)  # ... and this rank's own noise and dropout
        self.trainer.dropout_rng = dropout
        if sampling is not None:  # restored: this rank's streams as they were at the checkpoint
            self.trainer.load_sampling_state(sampling)

    def sampling_state(self) -> dict[str, Any]:
        return self.trainer.sampling_state()

    def join(self, init_method: str, backend: str) -> None:
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=init_method, rank=self.trainer.rank,
                                world_size=self.trainer.world, timeout=DIST_TIMEOUT)
        self.trainer.attach_process_group()

    def train_iteration(self) -> None:
        self.trainer.train_step()
        self.trainer.steps += 1

    def parameter_digest(self) -> list[np.ndarray]:
        return self.trainer.parameter_digest()


RemoteDataParallelRank: Any = None  # ray.remote(DataParallelRank), made when a trial first needs it
