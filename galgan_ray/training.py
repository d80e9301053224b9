"""Pure-torch training loops for the SR GAN and the DCGAN, and the validation metrics.

There is one loop per model; the Ray Train worker (:mod:`galgan_ray.ray_shell.train`) calls the same
functions with ``rank``, ``world_size`` and a ``wrap_model`` hook (DistributedDataParallel), so a
notebook run and a cluster run share every line of the science.

Losses of :func:`train_srgan` (all in the scaled space of :mod:`galgan_ray.models`)
----------------------------------------------------------------------------------
- content: L1 between prediction and the scaled HR target (``content_weight``);
- adversarial: non-saturating GAN loss, BCE with logits on the PatchGAN map of the conditional
  discriminator (``adversarial_weight``, small: the content term leads, the adversary sharpens);
- flux consistency (``flux_weight``, 0 = off): the HR prediction in nJy is degraded back with a
  differentiable ``TorchDegrader`` (HR nJy -> noiseless LR nJy) and compared with the *noisy* LR
  input by L1 in the same arcsinh-scaled, sigma_lr-normalised space as the input. L1 estimates a
  median, and medians commute with the monotonic arcsinh, so for symmetric noise the loss is
  minimised by the noiseless degraded image: the noise does not bias the flux, it only adds variance.

Validation metrics (each ``eval_every`` epochs, on held-out cutouts)
--------------------------------------------------------------------
``val_psnr`` and ``val_ssim`` (mean over images, scaled space, data range = the target's max - min
per image, SSIM with an 11-px Gaussian window of sigma 1.5), ``val_l1``, and ``val_flux_err_median``:
the median over images and bands of ``|sum HR_pred - sum HR_true| / sum HR_true`` in nJy (bands with
a non-positive true sum are skipped). ``baseline_*`` are the same for the bicubic x3 upsampling of
the input (flux-conserving: divided by the pixel-area ratio 9).

Data
----
``train_data`` / ``val_data`` are a dict of numpy arrays (``image_lr (N, C, 22, 22)``,
``image_hr (N, C, 64, 64)``, ``sigma_lr (N, C)``; the galaxy-set layout of docs/ARCHITECTURE.md), or
an iterable of such batches (re-iterated each epoch), or a callable ``epoch -> iterable of
batches`` (e.g. a Ray Data shard's ``iter_batches``). A dict is shuffled each epoch with
``default_rng([seed, epoch])`` (the same permutation on every rank) and each rank takes its slice of
every global batch, so ``batch_size`` is the *global* batch size. Iterables are taken as already
sharded; in distributed runs all ranks stop at the shortest shard (a 1-element all-reduce per step).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import to_dict
from .degrade import DegradeConfig, TorchDegrader
from .errors import ConfigError, InputError
from .models import (
    DCGANConfig,
    SRGANConfig,
    build_discriminator,
    build_generator,
    postprocess,
    prepare_batch,
    upsample_baseline,
)
from .progress import progress

__all__ = [
    "TrainConfig",
    "TrainState",
    "train_srgan",
    "train_dcgan",
    "evaluate_srgan",
    "psnr",
    "ssim",
    "resolve_device",
]

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]
DataSource = Union[Mapping[str, Any], Iterable[Batch], Callable[[int], Iterable[Batch]]]
EpochHook = Callable[["TrainState", dict], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by :func:`train_srgan` and :func:`train_dcgan`.

    Attributes
    ----------
    epochs : int
        Total number of epochs (a resumed run continues up to this number).
    batch_size : int
        Global batch size, split evenly over ``world_size`` ranks.
    lr_g, lr_d : float
        Adam learning rates of generator and discriminator.
    betas : tuple of float or None
        Adam betas; None: (0.9, 0.999) for the SR GAN (content-led, as SRGAN/ESRGAN) and
        (0.5, 0.999) for the DCGAN (Radford et al.).
    content_weight : float
        Weight of the L1 content loss (SR only).
    adversarial_weight : float
        Weight of the generator's adversarial loss (SR only; 0 switches the discriminator off).
    flux_weight : float
        Weight of the flux-consistency loss (SR only; 0 = off; needs a degrader).
    total_flux_weight : float
        Weight of the supervised total-flux loss (SR only; 0 = off): ``|sum(output) - sum(target)|`` in nJy
        over the noise of the input's sum (``sigma_lr * lr_size``), so a one-sigma error costs about 1.
        The L1 content loss is dominated by background pixels and pins the total flux only loosely; the
        flux term's gradient is coherent over the whole image, so keep its weight small (~1e-4 or less:
        at 2e-4 the content loss stopped improving in 100-step trials).
    discriminator_batches : {"separate", "joint"}
        ``separate``: real and fake go through the discriminator in separate calls (the DCGAN
        recipe, see ``_discriminator_step``). ``joint``: one call on the concatenated batch -- with
        BatchNorm the discriminator then reads the batch composition and its generator-step verdict
        means something else, which in effect weakens the adversary. The shipped models use it:
        with separate batches (and label smoothing) the adversary became effective and invented
        peaks in the blend benchmark.
    label_smoothing : float
        One-sided label smoothing of the discriminator's real targets (``1 - label_smoothing``;
        Salimans et al. 2016): keeps the discriminator from saturating.
    ema_decay : float
        Exponential moving average of the generator's weights (Polyak averaging, as in ESRGAN and
        StyleGAN; 0 = off). With it, validation and the saved ``generator_state`` use the average,
        updated after every step with ``min(ema_decay, (1 + step) / (10 + step))``. The raw weights
        wander from step to step (the total flux of the SR output by several percent between epochs); the
        average does not. A resumed run restarts both from the saved (averaged) weights.
    lr_schedule : {"constant", "cosine"}
        Learning rates per epoch: constant, or cosine-annealed from ``lr`` to ``lr / 20`` over ``epochs``.
    pretrain_epochs : int
        SR epochs with the content (+ flux) loss only before the adversary starts.
    augment : bool
        Random rot90 / flip per batch (the same for LR and HR: both grids are co-centred).
    validation_fraction : float
        Held-out fraction when ``val_data`` is None and ``train_data`` is a dict.
    seed : int
        Model initialisation (identical on all ranks), shuffling ``[seed, epoch]`` and
        augmentation ``[seed, rank, epoch]``.
    device : str or None
        None: ``cuda`` when available, else ``cpu``.
    num_threads : int or None
        ``torch.set_num_threads`` (None leaves torch's default).
    log_every : int
        Log running losses every N steps (rank 0).
    eval_every : int
        Validate every N epochs (and after the last one).
    max_steps_per_epoch : int or None
        Cap on steps per epoch (benchmarks, smoke tests).
    eval_batch_size : int
        Batch size of validation.
    """

    epochs: int = 20
    batch_size: int = 32
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] | None = None
    content_weight: float = 1.0
    adversarial_weight: float = 3e-3
    flux_weight: float = 0.0
    total_flux_weight: float = 0.0
    discriminator_batches: Literal["separate", "joint"] = "separate"
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    pretrain_epochs: int = 0
    augment: bool = True
    validation_fraction: float = 0.1
    seed: int = 0
    device: str | None = None
    num_threads: int | None = None
    log_every: int = 50
    eval_every: int = 1
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("TrainConfig", "epochs >= 0, batch_size >= 1 and eval_batch_size >= 1 required")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError("TrainConfig.validation_fraction", f"must be in [0, 1), got {self.validation_fraction}")
        if min(self.content_weight, self.adversarial_weight, self.flux_weight, self.total_flux_weight) < 0:
            raise ConfigError("TrainConfig", "loss weights must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("TrainConfig.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("TrainConfig.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.discriminator_batches not in ("separate", "joint"):
            raise ConfigError("TrainConfig.discriminator_batches", f"'separate' or 'joint', got {self.discriminator_batches!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError("TrainConfig.lr_schedule", f"'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.log_every < 1 or self.eval_every < 1:
            raise ConfigError("TrainConfig", "log_every and eval_every must be >= 1")


@dataclass
class TrainState:
    """What a training loop returns and passes to ``on_epoch_end``.

    Attributes
    ----------
    generator, discriminator : torch.nn.Module
        The *unwrapped* modules (``.module`` of a DDP wrapper), on the training device.
    optimizer_g, optimizer_d : torch.optim.Optimizer
    epoch : int
        Completed epochs.
    step : int
        Completed optimisation steps (this rank).
    model_cfg : SRGANConfig or DCGANConfig
    train_cfg : TrainConfig
    rank, world_size : int
    """

    generator: nn.Module
    discriminator: nn.Module
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    model_cfg: SRGANConfig | DCGANConfig
    train_cfg: TrainConfig
    epoch: int = 0
    step: int = 0
    rank: int = 0
    world_size: int = 1
    history: list[dict] = field(default_factory=list)
    generator_ema: nn.Module | None = None

    @property
    def inference_generator(self) -> nn.Module:
        """The generator to validate and save: the weight average when ``ema_decay > 0``, else the raw one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def update_average(self) -> None:
        """One step of the weight average (no-op without ``ema_decay``); buffers are copied."""
        if self.generator_ema is None:
            return
        decay = min(self.train_cfg.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            for avg, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
                avg.lerp_(p.detach(), 1.0 - decay)
            for avg, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
                avg.copy_(b)

    def state_dicts(self) -> dict[str, Any]:
        """Keyword arguments for :func:`galgan_ray.checkpoint.save_checkpoint` (weights, optimisers, counters)."""
        return {
            "generator_state": self.inference_generator.state_dict(),
            "discriminator_state": self.discriminator.state_dict(),
            "optimizer_g_state": self.optimizer_g.state_dict(),
            "optimizer_d_state": self.optimizer_d.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
        }


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` or, when None, ``cuda`` if available else ``cpu``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _data_range(target: torch.Tensor, data_range) -> torch.Tensor:
    if data_range is None:
        flat = target.reshape(target.shape[0], -1)
        rng = flat.amax(dim=1) - flat.amin(dim=1)
        return rng.clamp_min(1e-8).reshape(-1, 1, 1, 1)
    return torch.as_tensor(data_range, dtype=target.dtype, device=target.device).reshape(-1, 1, 1, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor, *, data_range: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(L^2 / MSE)`` (dB).

    Parameters
    ----------
    pred, target : torch.Tensor ``(N, C, H, W)``
    data_range : float, optional
        ``L``; default the target's ``max - min`` per image.

    Returns
    -------
    torch.Tensor ``(N,)``
    """
    L = _data_range(target, data_range).reshape(-1)
    mse = (pred - target).pow(2).reshape(pred.shape[0], -1).mean(dim=1).clamp_min(1e-20)
    return 10.0 * torch.log10(L**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(pred: torch.Tensor, target: torch.Tensor, *, data_range: float | None = None,
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, Gaussian window, valid region only.

    Parameters
    ----------
    pred, target : torch.Tensor ``(N, C, H, W)``
        Bands are treated separately and averaged.
    data_range : float, optional
        ``L`` of the constants ``(k1 L)^2, (k2 L)^2``; default the target's ``max - min`` per image.
    window_size, sigma : int, float
        Gaussian window (11 px, sigma 1.5 as in the reference implementation).

    Returns
    -------
    torch.Tensor ``(N,)``
        Mean SSIM of each image (1 for identical images).
    """
    if pred.shape != target.shape:
        raise InputError("ssim", f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    c = pred.shape[1]
    w = _gaussian_window(window_size, sigma, c, pred.device, pred.dtype)
    L = _data_range(target, data_range)
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(pred), filt(target)
    sxx = filt(pred * pred) - mu_x**2
    syy = filt(target * target) - mu_y**2
    sxy = filt(pred * target) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).reshape(pred.shape[0], -1).mean(dim=1)


def _flux_rel_err(pred_njy: torch.Tensor, true_njy: torch.Tensor) -> torch.Tensor:
    ps, ts = pred_njy.sum(dim=(-2, -1)), true_njy.sum(dim=(-2, -1))
    ok = ts > 0
    return ((ps - ts).abs() / ts.abs().clamp_min(1e-30))[ok]


# ----------------------------------------------------------------------------------------------
# Data plumbing
# ----------------------------------------------------------------------------------------------
def _is_table(data) -> bool:
    return isinstance(data, Mapping)


def _n_rows(table: Mapping[str, Any], where: str) -> int:
    for key in ("image_hr", "image_lr"):
        if key in table:
            return len(table[key])
    raise InputError(where, f"needs an 'image_hr' or 'image_lr' column; has {sorted(table)}")


def _take(table: Mapping[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """Rows ``idx`` of every per-row column (columns of another length, e.g. metadata, are left out)."""
    n = _n_rows(table, "data")
    return {k: np.asarray(v)[idx] for k, v in table.items()
            if isinstance(v, (np.ndarray, list, tuple)) and len(v) == n}


def _split_validation(table: Mapping[str, Any], fraction: float, seed: int) -> tuple[dict, dict | None]:
    n = _n_rows(table, "train_data")
    n_val = int(round(n * fraction))
    if n_val == 0 or n_val >= n:
        return dict(table), None
    perm = np.random.default_rng([seed, 7919]).permutation(n)  # 7919: a fixed id for the split
    return _take(table, np.sort(perm[n_val:])), _take(table, np.sort(perm[:n_val]))


def _dist_active(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _allreduce(value: float, op: str, world_size: int, device) -> float:
    if not _dist_active(world_size):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}[op]
    torch.distributed.all_reduce(t, op=red)
    return float(t.item())


def _gather_arrays(arrays: dict[str, np.ndarray], world_size: int) -> dict[str, np.ndarray]:
    if not _dist_active(world_size):
        return arrays
    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, arrays)
    return {k: np.concatenate([o[k] for o in out]) for k in arrays}


def _table_batches(table: Mapping[str, Any], *, epoch: int, seed: int, batch_size: int, rank: int,
                   world_size: int, sharded: bool, shuffle: bool, drop_last: bool, device) -> Iterator[dict]:
    """Batches of this rank from an in-memory table (see the module docstring)."""
    n = _n_rows(table, "train_data")
    if sharded:
        local_b = max(1, batch_size // world_size)
        n_steps = n // local_b if drop_last else math.ceil(n / local_b)
        n_steps = int(_allreduce(n_steps, "min", world_size, device))
        order = np.random.default_rng([seed, rank, epoch]).permutation(n) if shuffle else np.arange(n)
        for k in range(n_steps):
            yield _take(table, np.sort(order[k * local_b:(k + 1) * local_b]))
        return
    if n < world_size:
        raise InputError("train_data", f"{n} rows cannot be split over {world_size} ranks")
    gb = min(batch_size, n)
    local_b = max(1, gb // world_size)
    gb = local_b * world_size
    n_steps = n // gb if drop_last else math.ceil(n / gb)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for k in range(n_steps):
        chunk = order[k * gb:(k + 1) * gb]
        mine = chunk[rank::world_size] if not drop_last else chunk[rank * local_b:(rank + 1) * local_b]
        if len(mine):
            yield _take(table, np.sort(mine))


def _epoch_batches(data: DataSource, *, epoch: int, train_cfg: TrainConfig, rank: int, world_size: int,
                   sharded: bool, device, batch_size: int, shuffle: bool = True, drop_last: bool = True
                   ) -> Iterator[dict]:
    if _is_table(data):
        yield from _table_batches(data, epoch=epoch, seed=train_cfg.seed, batch_size=batch_size, rank=rank,
                                  world_size=world_size, sharded=sharded, shuffle=shuffle,
                                  drop_last=drop_last, device=device)
        return
    source = data(epoch) if callable(data) else data
    it = iter(source)
    if it is source and epoch > 0 and not callable(data):
        log.warning("train_data is a one-shot iterator: epoch %d may see no data", epoch)
    sync = _dist_active(world_size)
    while True:
        batch = next(it, None)
        if sync:  # all ranks stop together at the shortest shard (DDP would hang otherwise)
            flag = torch.tensor([0 if batch is None else 1], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if int(flag.item()) == 0:
                return
        if batch is None:
            return
        yield batch


def _augment(tensors: list[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for t in tensors:
        if k:
            t = torch.rot90(t, k, dims=(-2, -1))
        if flip:
            t = torch.flip(t, dims=(-1,))
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------------
# Shared loop
# ----------------------------------------------------------------------------------------------
def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "module", m)


def _bce(logits: torch.Tensor, real: bool, smoothing: float = 0.0) -> torch.Tensor:
    target = torch.full_like(logits, 1.0 - smoothing) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def _discriminator_step(state: "TrainState", d_run: nn.Module, real: tuple, fake: tuple, smoothing: float,
                        joint: bool = False) -> dict[str, torch.Tensor]:
    """One discriminator update on a real and a fake batch.

    Real and fake go through the discriminator in *separate* calls, each with its own backward (the
    DCGAN recipe): with BatchNorm, a mixed real+fake batch lets the discriminator read the batch
    statistics, and its verdict in the generator's fake-only call then means something else --
    the discriminator "wins" while the generator's loss says it is fooled, and no useful gradient
    flows. One backward per forward also keeps DistributedDataParallel happy.
    """
    state.optimizer_d.zero_grad(set_to_none=True)
    if joint:  # TrainConfig.discriminator_batches == "joint": one call on real + fake
        logits = d_run(*(torch.cat([r, f]) for r, f in zip(real, fake)))
        l_real, l_fake = logits.split(real[0].shape[0])
        loss_real, loss_fake = _bce(l_real, True, smoothing), _bce(l_fake, False)
        (0.5 * (loss_real + loss_fake)).backward()
    else:
        l_real = d_run(*real)
        loss_real = _bce(l_real, True, smoothing)
        loss_real.backward()
        l_fake = d_run(*fake)
        loss_fake = _bce(l_fake, False)
        loss_fake.backward()
    state.optimizer_d.step()
    return {"loss_d": 0.5 * (loss_real.detach() + loss_fake.detach()),
            "d_real": torch.sigmoid(l_real.detach()).mean(), "d_fake": torch.sigmoid(l_fake.detach()).mean()}


def _set_learning_rates(state: "TrainState", epoch: int) -> None:
    """Per-epoch learning rates from ``train_cfg.lr_schedule`` (a function of the epoch: resumes agree)."""
    cfg = state.train_cfg
    if cfg.lr_schedule == "constant":
        f = 1.0
    else:
        f = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    for opt, lr in ((state.optimizer_g, cfg.lr_g), (state.optimizer_d, cfg.lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr * f


def _setup(model_cfg, train_cfg: TrainConfig, start_state: Mapping[str, Any] | None, wrap_model, rank: int,
           world_size: int, default_betas: tuple[float, float]) -> tuple[TrainState, nn.Module, nn.Module, torch.device]:
    device = resolve_device(train_cfg.device)
    if train_cfg.num_threads:
        torch.set_num_threads(int(train_cfg.num_threads))
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    gen, disc = build_generator(model_cfg).to(device), build_discriminator(model_cfg).to(device)
    betas = tuple(train_cfg.betas) if train_cfg.betas is not None else default_betas
    opt_g = torch.optim.Adam(gen.parameters(), lr=train_cfg.lr_g, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=train_cfg.lr_d, betas=betas)
    state = TrainState(gen, disc, opt_g, opt_d, model_cfg, train_cfg, rank=rank, world_size=world_size)
    if start_state is not None:
        _restore(state, start_state)
    if train_cfg.ema_decay > 0:
        state.generator_ema = copy.deepcopy(gen).eval().requires_grad_(False)
    wrap = wrap_model or (lambda m: m)
    return state, wrap(gen), wrap(disc), device


def _restore(state: TrainState, start: Mapping[str, Any]) -> None:
    """Load weights, optimiser states and counters of a previous run (``checkpoint.load_training_state``)."""
    where = str(start.get("path", "start_state"))
    saved_cfg = (start.get("meta") or {}).get("model", {}).get("config")
    if saved_cfg is not None:
        if saved_cfg != to_dict(state.model_cfg):
            raise ConfigError(where, "the checkpoint was trained with another model config; "
                                     f"saved {saved_cfg}, requested {to_dict(state.model_cfg)}")
    try:
        state.generator.load_state_dict(start["generator"])
        if start.get("discriminator") is not None:
            state.discriminator.load_state_dict(start["discriminator"])
        if start.get("optimizer_g") is not None:
            state.optimizer_g.load_state_dict(start["optimizer_g"])
        if start.get("optimizer_d") is not None:
            state.optimizer_d.load_state_dict(start["optimizer_d"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ConfigError(where, f"cannot restore training state: {exc}") from exc
    state.epoch = int(start.get("epoch", 0))
    state.step = int(start.get("step", 0))


def _run(kind: str, state: TrainState, g_run: nn.Module, d_run: nn.Module, device: torch.device, *,
         train_data: DataSource, val_data: DataSource | None, step_fn, eval_fn, on_epoch_end: EpochHook | None,
         data_is_sharded: bool) -> tuple[TrainState, list[dict]]:
    cfg = state.train_cfg
    rank, world = state.rank, state.world_size
    history: list[dict] = []
    start_epoch = state.epoch
    for epoch in progress(range(state.epoch, cfg.epochs), desc=f"{kind} epochs", unit="epoch", leave=True):
        _set_learning_rates(state, epoch)
        state.generator.train()
        state.discriminator.train()
        aug_rng = np.random.default_rng([cfg.seed, rank, epoch])
        sums: dict[str, torch.Tensor] = {}
        n_steps = n_images = 0
        t0 = time.perf_counter()
        for batch in _epoch_batches(train_data, epoch=epoch, train_cfg=cfg, rank=rank, world_size=world,
                                    sharded=data_is_sharded, device=device, batch_size=cfg.batch_size):
            losses, n = step_fn(batch, epoch, aug_rng)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_steps += 1
            n_images += n
            state.step += 1
            state.update_average()
            if rank == 0 and state.step % cfg.log_every == 0:
                log.info("%s epoch %d step %d: %s", kind, epoch + 1, state.step,
                         ", ".join(f"{k}={float(v) / n_steps:.4g}" for k, v in sums.items()))
            if cfg.max_steps_per_epoch and n_steps >= cfg.max_steps_per_epoch:
                break
        train_seconds = time.perf_counter() - t0
        total_images = _allreduce(n_images, "sum", world, device)
        slowest = _allreduce(train_seconds, "max", world, device)
        metrics: dict[str, float] = {"epoch": epoch + 1, "start_epoch": start_epoch, "step": state.step,
                                     "train_images": int(total_images),
                                     "train_seconds": slowest,
                                     "images_per_s": total_images / slowest if slowest > 0 else float("nan")}
        for k, v in sums.items():
            metrics[k] = _allreduce(float(v) / max(n_steps, 1), "sum", world, device) / world
        last = epoch + 1 == cfg.epochs
        if eval_fn is not None and val_data is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            metrics.update(eval_fn(val_data))
        state.epoch = epoch + 1
        history.append(metrics)
        state.history.append(metrics)
        if rank == 0:
            log.info("%s epoch %d/%d: %s", kind, epoch + 1, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        if on_epoch_end is not None:
            on_epoch_end(state, metrics)
    return state, history


# ----------------------------------------------------------------------------------------------
# SR GAN
# ----------------------------------------------------------------------------------------------
def _default_degrader() -> nn.Module:
    try:
        return TorchDegrader(DegradeConfig())
    except TypeError as exc:
        raise ConfigError("train.flux_weight", f"pass degrader=TorchDegrader(...) explicitly: {exc}") from exc


def evaluate_srgan(generator: nn.Module, data: DataSource, *, scaling=None, batch_size: int = 64,
                   device=None, rank: int = 0, world_size: int = 1, data_is_sharded: bool = False
                   ) -> dict[str, float]:
    """Validation metrics of an SR generator and of the bicubic baseline (module docstring).

    Parameters
    ----------
    generator : torch.nn.Module
        Maps scaled LR ``(B, C, 22, 22)`` to scaled HR ``(B, C, 64, 64)``; its ``cfg`` supplies the
        scaling, factor and crop when ``scaling`` is None.
    data : dict of numpy arrays or iterable of batches
        ``image_lr``, ``image_hr`` (nJy), ``sigma_lr``.
    scaling : ArcsinhScaling, optional
    batch_size : int
    device : optional
        Default: the generator's device.
    rank, world_size : int
        In a distributed run each rank evaluates its part and the per-image values are gathered.
    data_is_sharded : bool
        ``data`` already holds only this rank's rows.

    Returns
    -------
    dict
        ``val_psnr``, ``val_ssim``, ``val_l1``, ``val_flux_err_median``, ``baseline_psnr``,
        ``baseline_ssim``, ``baseline_l1``, ``baseline_flux_err_median``, ``val_count``.
    """
    model = _unwrap(generator)
    cfg: SRGANConfig = model.cfg
    scaling = scaling or cfg.scaling
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    per: dict[str, list[np.ndarray]] = {k: [] for k in ("psnr", "ssim", "l1", "flux", "b_psnr", "b_ssim", "b_l1",
                                                          "b_flux")}
    if _is_table(data) and not data_is_sharded and world_size > 1:
        n = _n_rows(data, "val_data")
        data, data_is_sharded = _take(data, np.arange(rank, n, world_size)), True
    sharded = data_is_sharded or not _is_table(data)
    with torch.no_grad():
        batches = (_table_batches(data, epoch=0, seed=0, batch_size=batch_size, rank=0, world_size=1,
                                  sharded=False, shuffle=False, drop_last=False, device=device)
                   if _is_table(data) else iter(data(0) if callable(data) else data))
        for batch in batches:
            x, y = prepare_batch(batch["image_lr"], batch["image_hr"], batch["sigma_lr"], scaling, device=device)
            hr = torch.as_tensor(np.asarray(batch["image_hr"], dtype=np.float32), device=device)
            pred = model(x)
            base = upsample_baseline(x, scaling=scaling, factor=cfg.factor, crop=cfg.crop, mode="bicubic")
            for prefix, img in (("", pred), ("b_", base)):
                per[prefix + "psnr"].append(psnr(img, y).cpu().numpy())
                per[prefix + "ssim"].append(ssim(img, y).cpu().numpy())
                per[prefix + "l1"].append((img - y).abs().mean(dim=(1, 2, 3)).cpu().numpy())
                njy = postprocess(img, batch["sigma_lr"], scaling)
                per[prefix + "flux"].append(_flux_rel_err(njy, hr).cpu().numpy())
    if was_training:
        model.train()
    arrays = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in per.items()}
    if sharded:
        arrays = _gather_arrays(arrays, world_size)

    def mean(a):
        return float(np.mean(a)) if a.size else float("nan")

    def median(a):
        return float(np.median(a)) if a.size else float("nan")

    return {
        "val_psnr": mean(arrays["psnr"]), "val_ssim": mean(arrays["ssim"]), "val_l1": mean(arrays["l1"]),
        "val_flux_err_median": median(arrays["flux"]),
        "baseline_psnr": mean(arrays["b_psnr"]), "baseline_ssim": mean(arrays["b_ssim"]),
        "baseline_l1": mean(arrays["b_l1"]), "baseline_flux_err_median": median(arrays["b_flux"]),
        "val_count": int(arrays["psnr"].size),
    }


def train_srgan(train_data: DataSource, val_data: DataSource | None = None, *,
                model_cfg: SRGANConfig | None = None, train_cfg: TrainConfig | None = None,
                degrader: nn.Module | None = None, on_epoch_end: EpochHook | None = None,
                start_state: Mapping[str, Any] | None = None, rank: int = 0, world_size: int = 1,
                wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                data_is_sharded: bool = False) -> tuple[TrainState, list[dict]]:
    """Train the conditional super-resolution GAN (content L1 + adversarial + optional flux consistency).

    Parameters
    ----------
    train_data : dict of numpy arrays, iterable of batches, or callable ``epoch -> iterable``
        ``image_lr (N, C, 22, 22)``, ``image_hr (N, C, 64, 64)`` in nJy and ``sigma_lr (N, C)``.
    val_data : same, optional
        Default: ``validation_fraction`` of a dict ``train_data`` (none for iterables).
    model_cfg : SRGANConfig
    train_cfg : TrainConfig
    degrader : torch.nn.Module, optional
        Differentiable HR nJy ``(B, C, 64, 64)`` -> LR nJy ``(B, C, 22, 22)`` (``degrade.TorchDegrader``);
        needed when ``flux_weight > 0`` (default: ``TorchDegrader(DegradeConfig())``).
    on_epoch_end : callable ``(state, metrics) -> None``, optional
        Called on every rank after each epoch (checkpointing, ``ray.train.report``).
    start_state : mapping, optional
        Resume from ``checkpoint.load_training_state(...)``: weights, optimisers, ``epoch``, ``step``.
    rank, world_size : int
        This process's place in a distributed run (torch.distributed already initialised).
    wrap_model : callable, optional
        Applied to generator and discriminator after they are built, moved and restored (e.g.
        ``ray.train.torch.prepare_model``); the optimisers hold the unwrapped parameters.
    data_is_sharded : bool
        A dict ``train_data`` / ``val_data`` already holds only this rank's rows.

    Returns
    -------
    state : TrainState
        Unwrapped modules, optimisers, ``epoch`` (completed epochs), ``step``.
    history : list of dict
        One dict per epoch run here: ``epoch``, ``start_epoch`` (epochs already done when this call
        started: > 0 after a resume), ``step``, ``train_images``, ``train_seconds``,
        ``images_per_s`` (all ranks, steps only), ``loss_g``, ``loss_content``, ``loss_adv``,
        ``loss_flux``, ``loss_d``, ``d_real``, ``d_fake`` (mean sigmoid outputs) and the
        :func:`evaluate_srgan` keys on validation epochs.
    """
    model_cfg = model_cfg or SRGANConfig()
    train_cfg = train_cfg or TrainConfig()
    if not isinstance(model_cfg, SRGANConfig):
        raise ConfigError("model", f"train_srgan needs an SRGANConfig, got {type(model_cfg).__name__}")
    if val_data is None and _is_table(train_data) and train_cfg.validation_fraction > 0:
        train_data, val_data = _split_validation(train_data, train_cfg.validation_fraction, train_cfg.seed)
    state, g_run, d_run, device = _setup(model_cfg, train_cfg, start_state, wrap_model, rank, world_size,
                                         (0.9, 0.999))
    scaling = model_cfg.scaling
    if train_cfg.flux_weight > 0:
        degrader = (degrader or _default_degrader()).to(device).eval()
        for p in degrader.parameters():
            p.requires_grad_(False)

    def step_fn(batch: Batch, epoch: int, rng: np.random.Generator):
        x, y = prepare_batch(batch["image_lr"], batch["image_hr"], batch["sigma_lr"], scaling, device=device)
        sigma = torch.as_tensor(np.asarray(batch["sigma_lr"], dtype=np.float32), device=device)
        if train_cfg.augment:
            x, y = _augment([x, y], rng)
        adv = train_cfg.adversarial_weight > 0 and epoch >= train_cfg.pretrain_epochs
        fake = g_run(x)
        out: dict[str, torch.Tensor] = {}
        if adv:
            out.update(_discriminator_step(state, d_run, (y, x), (fake.detach(), x), train_cfg.label_smoothing,
                                           joint=train_cfg.discriminator_batches == "joint"))
        loss_content = (fake - y).abs().mean()
        loss = train_cfg.content_weight * loss_content
        out["loss_content"] = loss_content
        if adv:
            loss_adv = _bce(d_run(fake, x), True)  # non-saturating generator loss
            loss = loss + train_cfg.adversarial_weight * loss_adv
            out["loss_adv"] = loss_adv
        if train_cfg.flux_weight > 0:
            lr_pred = degrader(postprocess(fake, sigma, scaling))
            loss_flux = (scaling.forward(lr_pred / sigma[:, :, None, None]) - x).abs().mean()
            loss = loss + train_cfg.flux_weight * loss_flux
            out["loss_flux"] = loss_flux
        if train_cfg.total_flux_weight > 0:
            # The sums are invariant under the rot90/flip augmentation: the raw HR batch serves.
            hr = torch.as_tensor(np.asarray(batch["image_hr"], dtype=np.float32), device=device)
            pred_sum = postprocess(fake, sigma, scaling).sum(dim=(-2, -1))
            norm = sigma.reshape(pred_sum.shape) * float(model_cfg.lr_size)
            loss_tot = ((pred_sum - hr.sum(dim=(-2, -1))) / norm).abs().mean()
            loss = loss + train_cfg.total_flux_weight * loss_tot
            out["loss_total_flux"] = loss_tot
        state.optimizer_g.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer_g.step()
        out["loss_g"] = loss
        return out, x.shape[0]

    def eval_fn(data):
        return evaluate_srgan(state.inference_generator, data, scaling=scaling, batch_size=train_cfg.eval_batch_size,
                              device=device, rank=rank, world_size=world_size, data_is_sharded=data_is_sharded)

    return _run("srgan", state, g_run, d_run, device, train_data=train_data, val_data=val_data, step_fn=step_fn,
                eval_fn=eval_fn, on_epoch_end=on_epoch_end, data_is_sharded=data_is_sharded)


# ----------------------------------------------------------------------------------------------
# DCGAN
# ----------------------------------------------------------------------------------------------
def _dcgan_images(batch: Batch, cfg: DCGANConfig, device) -> torch.Tensor:
    """Scaled, [-1, 1]-clipped training images: ``forward(image_hr / sigma_hr)`` (nJy when no ``sigma_hr``)."""
    hr = np.asarray(batch["image_hr"])
    if hr.dtype == object:
        hr = np.stack(list(hr))
    img = torch.as_tensor(np.ascontiguousarray(hr, dtype=np.float32), device=device)
    if img.ndim != 4 or img.shape[1] != cfg.channels:
        raise InputError("image_hr", f"expected (N, {cfg.channels}, 64, 64), got {tuple(img.shape)}")
    if "sigma_hr" in batch:
        s = torch.as_tensor(np.asarray(batch["sigma_hr"], dtype=np.float32), device=device).reshape(
            img.shape[0], -1)[:, :, None, None]
        if not (s > 0).all():
            raise InputError("sigma_hr", "noise sigma must be > 0")
        img = img / s
    return cfg.scaling.forward(img).clamp(-1.0, 1.0)


def train_dcgan(train_data: DataSource, *, model_cfg: DCGANConfig | None = None,
                train_cfg: TrainConfig | None = None, on_epoch_end: EpochHook | None = None,
                start_state: Mapping[str, Any] | None = None, rank: int = 0, world_size: int = 1,
                wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                data_is_sharded: bool = False) -> tuple[TrainState, list[dict]]:
    """Train the unconditional DCGAN (BCE minimax with the non-saturating generator loss, Adam).

    Parameters
    ----------
    train_data : dict of numpy arrays, iterable of batches, or callable ``epoch -> iterable``
        ``image_hr (N, C, 64, 64)`` nJy and, optionally, ``sigma_hr (N, C)``: images are divided by
        it, arcsinh-scaled with ``model_cfg.scaling`` and clipped to [-1, 1] (the Tanh range).
    model_cfg : DCGANConfig
    train_cfg : TrainConfig
        ``lr_g``, ``lr_d``, ``betas``, ``batch_size``, ``epochs``, ``seed``... (SR loss weights unused).
    on_epoch_end, start_state, rank, world_size, wrap_model, data_is_sharded
        As in :func:`train_srgan`.

    Returns
    -------
    state : TrainState
    history : list of dict
        Per epoch: ``epoch``, ``start_epoch``, ``step``, ``train_images``, ``train_seconds``, ``images_per_s``,
        ``loss_d``, ``loss_g``, ``d_real``, ``d_fake``.
    """
    model_cfg = model_cfg or DCGANConfig()
    train_cfg = train_cfg or TrainConfig()
    if not isinstance(model_cfg, DCGANConfig):
        raise ConfigError("model", f"train_dcgan needs a DCGANConfig, got {type(model_cfg).__name__}")
    state, g_run, d_run, device = _setup(model_cfg, train_cfg, start_state, wrap_model, rank, world_size,
                                         (0.5, 0.999))
    noise_gen = torch.Generator(device="cpu")

    def step_fn(batch: Batch, epoch: int, rng: np.random.Generator):
        real = _dcgan_images(batch, model_cfg, device)
        if train_cfg.augment:
            (real,) = _augment([real], rng)
        noise_gen.manual_seed(int(rng.integers(2**62)))
        z = torch.randn(real.shape[0], model_cfg.latent_dim, generator=noise_gen).to(device)
        fake = g_run(z)
        out = _discriminator_step(state, d_run, (real,), (fake.detach(),), train_cfg.label_smoothing,
                                  joint=train_cfg.discriminator_batches == "joint")
        loss_g = _bce(d_run(fake), True)
        state.optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward()
        state.optimizer_g.step()
        out["loss_g"] = loss_g
        return out, real.shape[0]

    return _run("dcgan", state, g_run, d_run, device, train_data=train_data, val_data=None, step_fn=step_fn,
                eval_fn=None, on_epoch_end=on_epoch_end, data_is_sharded=data_is_sharded)
