"""``galgan sample``: draw galaxies from a trained DCGAN and show them beside real ones (one PNG)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import InputError
from ..figures import _plt, asinh_display
from ..models import DCGANConfig
from ..shards import read_shards

__all__ = ["register", "run", "sample_galaxies", "real_galaxies", "plot_sample_grid"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="PNG of galaxies drawn from a DCGAN checkpoint, beside real ones",
        description="Draw N galaxies from a DCGAN checkpoint (noise -> 64x64 HST-like image) and write one PNG: "
                    "generated galaxies on the left, N real ones (image_hr of a galaxy-set shard directory) on the "
                    "right, both with an arcsinh stretch.")
    p.add_argument("--model", required=True, metavar="CKPT", help="DCGAN checkpoint path or URL")
    p.add_argument("--real", default=None, metavar="URL|none",
                   help="galaxy-set Parquet shard directory (column image_hr); 'none' or omitted: generated only")
    p.add_argument("--n", type=int, default=16, help="galaxies per block")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise vectors and of the real-galaxy draw")
    p.add_argument("--band", type=int, default=0, help="channel shown (multi-band models)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.set_defaults(func=run)


def sample_galaxies(checkpoint: str, *, n: int, seed: int = 0, device: str | None = None
                    ) -> tuple[np.ndarray, dict]:
    """Draw ``n`` galaxies from a DCGAN checkpoint.

    Parameters
    ----------
    checkpoint : str
        Path/URL of a checkpoint whose model kind is ``DCGANConfig``.
    n : int
        Number of galaxies.
    seed : int
        Seed of the noise vectors (drawn on the CPU, so results do not depend on the device).
    device : str, optional

    Returns
    -------
    images : numpy.ndarray
        float32 ``(n, C, 64, 64)`` in the training images' linear units: ``sigma_hr`` units when the
        DCGAN was trained with ``sigma_hr`` (the default galaxy sets), else nJy per pixel.
    meta : dict
        The checkpoint metadata.
    """
    if n < 1:
        raise InputError("--n", f"must be >= 1, got {n}")
    gen, meta = load_checkpoint(checkpoint, device=device)
    cfg = gen.cfg
    if not isinstance(cfg, DCGANConfig):
        raise InputError(meta.get("path", checkpoint), f"is a {type(cfg).__name__} checkpoint, not a DCGAN "
                                                       f"(use `galgan enhance` for super-resolution models)")
    z = torch.randn(n, cfg.latent_dim, generator=torch.Generator().manual_seed(int(seed)))
    dev = next(gen.parameters()).device
    with torch.inference_mode():
        y = gen(z.to(dev)).float()
    return cfg.scaling.inverse(y).cpu().numpy().astype(np.float32), meta


def real_galaxies(url: str, *, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random galaxies (``image_hr``, divided by ``sigma_hr`` when present) from a shard directory.

    Returns
    -------
    numpy.ndarray
        float32 ``(min(n, N), C, H, W)``.
    """
    batch, _ = read_shards(url)
    if "image_hr" not in batch:
        raise InputError(url, f"has no image_hr column (columns: {sorted(batch)})")
    img = np.asarray(batch["image_hr"])
    if img.dtype == object:
        img = np.stack(list(img))
    img = img.astype(np.float32)
    if img.ndim == 3:
        img = img[:, None]
    if img.ndim != 4 or len(img) == 0:
        raise InputError(url, f"image_hr has shape {img.shape}; expected (N, C, H, W) with N >= 1")
    if "sigma_hr" in batch:
        s = np.asarray(batch["sigma_hr"], dtype=np.float32).reshape(len(img), -1)
        if s.shape[1] == img.shape[1] and np.all(s > 0):
            img = img / s[:, :, None, None]
    rng = np.random.default_rng([int(seed), 1])
    idx = np.sort(rng.choice(len(img), size=min(n, len(img)), replace=False))
    return img[idx]


def _mosaic(images: np.ndarray, *, gap: int = 2) -> np.ndarray:
    """Display-stretched ``(N, H, W)`` stamps on a near-square grid, NaN gaps between them."""
    n, h, w = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for k in range(n):
        r, c = divmod(k, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = asinh_display(images[k], noise=1.0)
    return out


def plot_sample_grid(generated: np.ndarray, real: np.ndarray | None = None, *, out: str | Path,
                     band: int = 0, title: str | None = None) -> Path:
    """One PNG: generated stamps (left block) beside real ones (right block).

    Parameters
    ----------
    generated, real : numpy.ndarray
        ``(N, C, H, W)`` in noise-sigma units (arcsinh softening 1).
    out : path
        PNG written (parent folders are created).
    band : int
        Channel shown.
    title : str, optional

    Returns
    -------
    pathlib.Path
    """
    plt = _plt()
    for name, arr in (("generated", generated), ("real", real)):
        if arr is not None and not 0 <= band < arr.shape[1]:
            raise InputError("--band", f"{name} images have {arr.shape[1]} band(s), band {band} requested")
    blocks = [("generated (DCGAN)", _mosaic(generated[:, band]))]
    if real is not None:
        blocks.append(("real", _mosaic(real[:, band])))
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 4.6), squeeze=False)
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    for ax, (name, mos) in zip(axes[0], blocks):
        ax.imshow(mos, origin="lower", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    generated, meta = sample_galaxies(args.model, n=args.n, seed=args.seed, device=args.device)
    real = None
    if args.real is not None and str(args.real).lower() != "none":
        real = real_galaxies(args.real, n=args.n, seed=args.seed)
        if real.shape[1] != generated.shape[1]:
            raise InputError(args.real, f"has {real.shape[1]} band(s), the DCGAN {args.model} makes "
                                        f"{generated.shape[1]}")
    title = f"{Path(str(meta.get('path', args.model))).name}, epoch {meta.get('epoch', '?')}, seed {args.seed}"
    path = plot_sample_grid(generated, real, out=args.out, band=args.band, title=title)
    print(f"{path}: {len(generated)} generated" + (f" + {len(real)} real from {args.real}" if real is not None else "")
          + f" galaxies (band {args.band})")
    return 0
