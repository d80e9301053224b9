"""A batched self-organising map (SOM) in torch, fast enough for 1e6 rows on two CPU cores.

The paper colours a 32x24 SOM of the blend parameters (separation, magnitude difference, sizes,
redshift difference) by the detection outcome. PyPI's ``sompy`` no longer works and ``minisom``
updates one row at a time (too slow for 1e6 rows), so this is a mini-batch *batch SOM*:

1. Inputs are standardised (zero mean, unit variance per column) unless told otherwise; the map
   lives in that space, and :attr:`SOM.weights` gives it back in data units.
2. Weights start on the plane of the first two principal components (``init="pca"``: the long
   side of the grid along the first component), or on random rows (``init="random"``).
3. Each step takes a mini-batch of shuffled rows, finds every row's best-matching unit (BMU, the
   nearest node), sums the rows per BMU, smooths those sums over the grid with the Gaussian
   neighbourhood ``h_ij = exp(-d_ij^2 / (2 sigma^2))`` (d: distance between nodes on the grid)
   and moves each node a fraction ``lr`` of the way to its neighbourhood-weighted batch mean
   (``lr = 1`` is the classic batch-SOM update on that batch).
4. ``lr`` and ``sigma`` decay from their initial to their final values over all steps,
   exponentially (geometrically) or linearly.
5. ``final_batch_iters`` classic full-data batch-SOM iterations at ``sigma_final`` polish the map
   (each node becomes the neighbourhood-weighted mean of all rows). It trades topology for fit:
   on the 4-column table of ``bench/bench_som.py`` (1e5 rows) 0, 1, 2 iterations give a
   quantisation error of 0.55, 0.51, 0.50 and a topographic error of 0.034, 0.051, 0.059; on a
   smooth 2-D sheet the polish brings the mini-batch map to the quality of a one-row-at-a-time
   online SOM (QE 0.30 vs 0.31) with no loss of topology.

The cost per step is one (batch x nodes) distance matrix: 10 epochs over 1e6 x 4 rows took
25 s on one CPU thread of the shared development machine, about 4e5 rows/s
(``bench/bench_som.py`` measures it).

Quality: the quantisation error (mean distance of a row to its BMU, in the standardised space)
and the topographic error (share of rows whose first and second BMUs are not adjacent on the grid;
adjacency is the 8-neighbourhood by default).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .config import config_json, from_dict
from .errors import ConfigError, InputError

__all__ = ["SOMConfig", "SOM", "fit_som", "load_som"]


@dataclass(frozen=True)
class SOMConfig:
    """Parameters of :func:`fit_som`.

    Attributes
    ----------
    shape : (int, int)
        Grid rows and columns (the paper's 32 x 24).
    epochs : int
        Passes over the data.
    batch_size : int
        Largest number of rows per update step.
    min_steps_per_epoch : int
        The batch is made smaller when needed so that each epoch has at least this many steps
        (the map needs many updates as ``lr`` and ``sigma`` decay; matters for small tables only).
    lr_initial, lr_final : float
        Learning rate (fraction of the way to the batch target) at the first and the last step.
    sigma_initial : float, optional
        Neighbourhood radius (grid cells) at the first step; default half the longer side.
    sigma_final : float
        Neighbourhood radius at the last step.
    decay : {"exponential", "linear"}
        How ``lr`` and ``sigma`` go from initial to final.
    final_batch_iters : int
        Full-data batch-SOM iterations at ``sigma_final`` after the mini-batch epochs.
    init : {"pca", "random"}
        Start on the first two principal components, or on random data rows.
    standardize : bool
        Train on (x - mean) / std per column.
    seed : int
        Seeds the shuffling and the random initialisation.
    device : str, optional
        Torch device; default ``"cuda"`` when available, else ``"cpu"``.
    """

    shape: tuple[int, int] = (32, 24)
    epochs: int = 10
    batch_size: int = 4096
    min_steps_per_epoch: int = 50
    lr_initial: float = 0.5
    lr_final: float = 0.02
    sigma_initial: float | None = None
    sigma_final: float = 1.0
    decay: Literal["exponential", "linear"] = "exponential"
    final_batch_iters: int = 1
    init: Literal["pca", "random"] = "pca"
    standardize: bool = True
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        if len(self.shape) != 2 or min(self.shape) < 2:
            raise ConfigError("som.shape", f"must be two sides >= 2, got {self.shape}")
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps_per_epoch < 1:
            raise ConfigError("som.epochs", "epochs, batch_size and min_steps_per_epoch must be >= 1")
        if not (0 < self.lr_final <= self.lr_initial <= 1):
            raise ConfigError("som.lr_initial", "need 0 < lr_final <= lr_initial <= 1")
        if not self.sigma_final > 0 or (self.sigma_initial is not None and self.sigma_initial < self.sigma_final):
            raise ConfigError("som.sigma_final", "need 0 < sigma_final <= sigma_initial")
        if self.final_batch_iters < 0:
            raise ConfigError("som.final_batch_iters", f"must be >= 0, got {self.final_batch_iters}")
        if self.decay not in ("exponential", "linear"):
            raise ConfigError("som.decay", f"must be 'exponential' or 'linear', got {self.decay!r}")
        if self.init not in ("pca", "random"):
            raise ConfigError("som.init", f"must be 'pca' or 'random', got {self.init!r}")


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _as_data(data, source: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim == 1 and dim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InputError(source, f"expected a table of shape (N, D), got {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InputError(source, f"expected {dim} columns, got {arr.shape[1]}")
    if not np.all(np.isfinite(arr)):
        raise InputError(source, "non-finite values; drop or impute those rows first")
    return arr


def _grid(shape: tuple[int, int]) -> np.ndarray:
    r, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float64)


def _schedule(start: float, end: float, frac: float, decay: str) -> float:
    if decay == "linear":
        return start + (end - start) * frac
    return start * (end / start) ** frac


@dataclass(eq=False)
class SOM:
    """A trained self-organising map.

    Attributes
    ----------
    weights_std : numpy.ndarray
        ``(H, W, D)`` float32 node weights in the standardised space the map was trained in.
    mean, scale : numpy.ndarray
        ``(D,)`` standardisation (zeros and ones when ``standardize`` was off).
    config : SOMConfig
    history : dict
        ``epoch_qe``: mean BMU distance of the rows seen in each epoch (during training);
        ``seconds``: training time; ``rows_per_s``: rows visited per second (mini-batch epochs and
        final batch iterations); ``steps``: mini-batch steps.
    """

    weights_std: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    config: SOMConfig = field(default_factory=SOMConfig)
    history: dict = field(default_factory=dict)

    # -- geometry ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Grid rows and columns."""
        return tuple(self.weights_std.shape[:2])

    @property
    def weights(self) -> np.ndarray:
        """``(H, W, D)`` float64 node weights in data units."""
        return self.weights_std.astype(np.float64) * self.scale + self.mean

    def _standardize(self, data, source: str) -> np.ndarray:
        arr = _as_data(data, source, dim=self.weights_std.shape[2])
        return ((arr - self.mean) / self.scale).astype(np.float32)

    def _nearest(self, data, k: int, chunk: int, source: str) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices ``(N, k)`` of the k nearest nodes and squared distances (standardised)."""
        x = self._standardize(data, source)
        dev = _device(self.config.device)
        w = torch.from_numpy(self.weights_std.reshape(-1, x.shape[1])).to(dev)
        w2 = (w * w).sum(1)
        idx = np.empty((len(x), k), dtype=np.int64)
        d2 = np.empty((len(x), k), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(x), chunk):
                xb = torch.from_numpy(x[s: s + chunk]).to(dev)
                dist = torch.addmm(w2[None, :], xb, w.T, alpha=-2.0)  # ||w||^2 - 2 x.w
                val, ind = torch.topk(dist, k, dim=1, largest=False)
                idx[s: s + chunk] = ind.cpu().numpy()
                d2[s: s + chunk] = (val + (xb * xb).sum(1, keepdim=True)).clamp_min(0).cpu().numpy()
        return idx, d2

    # -- mapping -------------------------------------------------------------------------------
    def bmu(self, data, *, flat: bool = False, chunk: int = 16384) -> np.ndarray:
        """Best-matching unit of each row.

        Parameters
        ----------
        data : array_like
            ``(N, D)`` rows in data units.
        flat : bool
            Return flat node numbers ``row * W + col`` instead of (row, col).
        chunk : int
            Rows per distance computation (memory knob).

        Returns
        -------
        numpy.ndarray
            int64 ``(N, 2)`` (grid row, grid column), or ``(N,)`` when ``flat``.
        """
        idx, _ = self._nearest(data, 1, chunk, "SOM.bmu")
        flat_idx = idx[:, 0]
        if flat:
            return flat_idx
        return np.stack(np.unravel_index(flat_idx, self.shape), axis=1).astype(np.int64)

    def quantization_error(self, data, *, chunk: int = 16384) -> float:
        """Mean Euclidean distance of the rows to their BMU, in the standardised space."""
        _, d2 = self._nearest(data, 1, chunk, "SOM.quantization_error")
        return float(np.sqrt(d2[:, 0]).mean())

    def topographic_error(self, data, *, connectivity: Literal[4, 8] = 8, chunk: int = 16384) -> float:
        """Share of rows whose first and second BMUs are not grid neighbours.

        Parameters
        ----------
        data : array_like
            ``(N, D)`` rows in data units.
        connectivity : {4, 8}
            Neighbours share a side (4) or a side or a corner (8, as MiniSom).
        chunk : int
            Rows per distance computation.

        Returns
        -------
        float
            Topographic error in [0, 1].
        """
        idx, _ = self._nearest(data, 2, chunk, "SOM.topographic_error")
        r, c = np.unravel_index(idx, self.shape)
        dr, dc = np.abs(r[:, 0] - r[:, 1]), np.abs(c[:, 0] - c[:, 1])
        adjacent = (np.maximum(dr, dc) <= 1) if connectivity == 8 else (dr + dc <= 1)
        return float(1.0 - adjacent.mean()) if len(idx) else float("nan")

    def umatrix(self) -> np.ndarray:
        """``(H, W)`` mean distance of each node to its 8 neighbours (standardised space)."""
        h, w = self.shape
        wt = self.weights_std.astype(np.float64)
        total = np.zeros((h, w))
        count = np.zeros((h, w))
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if dr == 0 and dc == 0:
                    continue
                r0, r1 = max(dr, 0), h + min(dr, 0)
                c0, c1 = max(dc, 0), w + min(dc, 0)
                d = np.linalg.norm(wt[r0:r1, c0:c1] - wt[r0 - dr: r1 - dr, c0 - dc: c1 - dc], axis=-1)
                total[r0 - dr: r1 - dr, c0 - dc: c1 - dc] += d
                count[r0 - dr: r1 - dr, c0 - dc: c1 - dc] += 1
        return total / count

    # -- colouring cells -----------------------------------------------------------------------
    def cell_stats(self, data_bmu, values) -> dict[str, np.ndarray]:
        """Statistics of a per-row quantity in each cell (to colour the map).

        Parameters
        ----------
        data_bmu : array_like
            ``(N, 2)`` BMUs from :meth:`bmu` (or ``(N,)`` flat indices).
        values : array_like
            ``(N,)`` a parameter (float) or an outcome (bool: the mean is a fraction).

        Returns
        -------
        dict of numpy.ndarray, each ``(H, W)``
            ``mean``: float64 (NaN in empty cells); ``std``: float64 population std;
            ``err``: float64, std / sqrt(count) (for booleans the binomial sqrt(p(1-p)/n));
            ``count``: int64 rows per cell.
        """
        h, w = self.shape
        b = np.asarray(data_bmu, dtype=np.int64)
        flat = b if b.ndim == 1 else np.ravel_multi_index((b[:, 0], b[:, 1]), (h, w))
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(v) != len(flat):
            raise InputError("SOM.cell_stats", f"{len(flat)} BMUs but {len(v)} values")
        count = np.bincount(flat, minlength=h * w)
        s1 = np.bincount(flat, weights=v, minlength=h * w)
        s2 = np.bincount(flat, weights=v * v, minlength=h * w)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, s1 / count, np.nan)
            std = np.sqrt(np.maximum(np.where(count > 0, s2 / count - mean**2, np.nan), 0.0))
            err = std / np.sqrt(count)
        return {"mean": mean.reshape(h, w), "std": std.reshape(h, w), "err": err.reshape(h, w),
                "count": count.reshape(h, w).astype(np.int64)}

    def cell_mean(self, data_bmu, values) -> np.ndarray:
        """``(H, W)`` mean of ``values`` per cell (NaN where empty); see :meth:`cell_stats`."""
        return self.cell_stats(data_bmu, values)["mean"]

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the map to an ``.npz`` file (weights, standardisation, config as JSON)."""
        np.savez(path, weights_std=self.weights_std, mean=self.mean, scale=self.scale,
                 config=np.array(config_json(self.config)), history=np.array(json.dumps(self.history)))


def load_som(path: str | Path) -> SOM:
    """Read a map written by :meth:`SOM.save`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            cfg = from_dict(SOMConfig, json.loads(str(z["config"])), where=str(path))
            return SOM(weights_std=z["weights_std"], mean=z["mean"], scale=z["scale"], config=cfg,
                       history=json.loads(str(z["history"])))
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(str(path), f"not a SOM file: {exc}") from exc


def _init_weights(x: torch.Tensor, shape: tuple[int, int], how: str, gen: torch.Generator) -> torch.Tensor:
    h, w = shape
    n, d = x.shape
    if how == "random":
        pick = torch.randint(0, n, (h * w,), generator=gen)
        return x[pick.to(x.device)].clone()
    sub = x if n <= 100_000 else x[torch.randperm(n, generator=gen)[:100_000].to(x.device)]
    mu = sub.mean(0)
    cov = torch.cov((sub - mu).T.double()).reshape(d, d)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    # Fix the eigenvector signs so the initial map does not depend on the LAPACK build.
    signs = torch.sign(evecs[torch.argmax(evecs.abs(), dim=0), torch.arange(d)])
    evecs = evecs * torch.where(signs == 0, 1.0, signs).to(evecs.dtype)
    a = torch.linspace(-1, 1, h, dtype=torch.float64, device=x.device)
    b = torch.linspace(-1, 1, w, dtype=torch.float64, device=x.device)
    e1 = evecs[:, 0] * evals[0].sqrt() * 2
    e2 = evecs[:, 1] * evals[1].sqrt() * 2 if d > 1 else torch.zeros_like(e1)
    if h < w:  # the longer side follows the first component
        grid = mu.double() + a[:, None, None] * e2 + b[None, :, None] * e1
    else:
        grid = mu.double() + a[:, None, None] * e1 + b[None, :, None] * e2
    return grid.reshape(h * w, d).to(x.dtype)


def _batch_update(weights: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, g2: torch.Tensor,
                  sigma: float, lr: float) -> torch.Tensor:
    """Move nodes a fraction ``lr`` towards their neighbourhood-weighted mean of the rows."""
    hmat = torch.exp(g2 * (-0.5 / sigma**2))
    num = hmat @ sums
    den = hmat @ counts
    ok = den > 1e-6
    target = num / den.clamp_min(1e-6)[:, None]
    return torch.where(ok[:, None], weights + lr * (target - weights), weights)


def fit_som(data, *, config: SOMConfig = SOMConfig()) -> SOM:
    """Train a self-organising map on a table of rows (see the module docstring).

    Parameters
    ----------
    data : array_like
        ``(N, D)`` finite values (data units), e.g. blend parameters.
    config : SOMConfig
        Grid, schedule, seed and device.

    Returns
    -------
    SOM
        The trained map: ``weights`` ``(H, W, D)``, ``bmu``, ``quantization_error``,
        ``topographic_error``, ``cell_stats``, ``save``.
    """
    arr = _as_data(data, "fit_som.data")
    n, d = arr.shape
    if n < 2:
        raise InputError("fit_som.data", "need at least two rows")
    t0 = time.perf_counter()
    if config.standardize:
        mean = arr.mean(axis=0).astype(np.float64)
        scale = arr.std(axis=0).astype(np.float64)
        scale = np.where(scale > 0, scale, 1.0)
    else:
        mean, scale = np.zeros(d), np.ones(d)
    dev = _device(config.device)
    x = torch.from_numpy(((arr - mean) / scale).astype(np.float32)).to(dev)
    gen = torch.Generator().manual_seed(int(config.seed))
    h, w = config.shape
    k = h * w
    weights = _init_weights(x, (h, w), config.init, gen)

    grid = torch.from_numpy(_grid((h, w))).to(dev)
    g2 = torch.cdist(grid, grid).pow(2).to(torch.float32)  # (K, K) squared grid distances
    sigma0 = config.sigma_initial if config.sigma_initial is not None else max(h, w) / 2.0
    bsz = max(1, min(config.batch_size, math.ceil(n / config.min_steps_per_epoch)))
    steps_per_epoch = math.ceil(n / bsz)
    total = config.epochs * steps_per_epoch
    epoch_qe: list[float] = []
    step = 0
    with torch.no_grad():
        for _ in range(config.epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            qe_sum = 0.0
            for s in range(0, n, bsz):
                frac = step / max(total - 1, 1)
                lr = _schedule(config.lr_initial, config.lr_final, frac, config.decay)
                sigma = _schedule(sigma0, config.sigma_final, frac, config.decay)
                xb = x[perm[s: s + bsz]]
                w2 = (weights * weights).sum(1)
                dist = torch.addmm(w2[None, :], xb, weights.T, alpha=-2.0)
                dmin, bmu = dist.min(dim=1)
                qe_sum += float((dmin + (xb * xb).sum(1)).clamp_min(0).sqrt().sum())
                sums = torch.zeros((k, d), dtype=x.dtype, device=dev).index_add_(0, bmu, xb)
                counts = torch.bincount(bmu, minlength=k).to(x.dtype)
                weights = _batch_update(weights, sums, counts, g2, sigma, lr)
                step += 1
            epoch_qe.append(qe_sum / n)
        chunk = 16384
        for _ in range(config.final_batch_iters):
            w2 = (weights * weights).sum(1)
            sums = torch.zeros((k, d), dtype=x.dtype, device=dev)
            counts = torch.zeros(k, dtype=x.dtype, device=dev)
            for s in range(0, n, chunk):
                xb = x[s: s + chunk]
                bmu = torch.addmm(w2[None, :], xb, weights.T, alpha=-2.0).argmin(dim=1)
                sums.index_add_(0, bmu, xb)
                counts += torch.bincount(bmu, minlength=k).to(x.dtype)
            weights = _batch_update(weights, sums, counts, g2, config.sigma_final, 1.0)
    seconds = time.perf_counter() - t0
    history = {"epoch_qe": epoch_qe, "seconds": seconds,
               "rows_per_s": (config.epochs + config.final_batch_iters) * n / seconds,
               "steps": total}
    return SOM(weights_std=weights.reshape(h, w, d).cpu().numpy().astype(np.float32), mean=mean,
               scale=scale, config=config, history=history)
