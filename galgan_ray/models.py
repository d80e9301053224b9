"""Networks of the paper: a DCGAN (noise -> HST-like galaxy) and a conditional super-resolution GAN.

The super-resolution (SR) generator turns an HSC-like low-resolution (LR) cutout, ``(B, C, 22, 22)`` at
0.18"/px, into an HST-like high-resolution (HR) one, ``(B, C, 64, 64)`` at 0.06"/px; the conditional
discriminator judges an HR image together with its LR input (Hemmati et al. 2022, Fig. 2, after the
DCGAN of Radford et al. 2016 and the PatchGAN of Isola et al. 2017).

Grids
-----
The 22 LR pixels cover 66 HR pixels (factor 3) and the two cutouts are co-centred, so every x3
upsampling here produces 66x66 and crops one pixel on each side to 64x64. Bicubic/nearest upsampling
uses ``align_corners=False``, which maps LR pixel centres onto the co-centred HR grid exactly.

Normalisation contract (what every caller of an SR model must do)
------------------------------------------------------------------
1. The LR input is divided by its own per-band noise sigma, ``sigma_lr`` (nJy, the ``sigma_lr``
   column of a degraded set, shape ``(N, C)``), so flux units and depth do not matter.
2. The HR target is expressed in the *same* units: HR nJy / ``sigma_lr`` (not HR noise units). An HR
   pixel covers 1/9 of an LR pixel's area, so for the same surface brightness the HR values are
   9x smaller than the LR ones; the generator's skip path accounts for this.
3. Both then go through :class:`galgan_ray.scaling.ArcsinhScaling` with the parameters stored in
   the model config (``SRGANConfig.scaling``; default softening 1 sigma_lr, scale 10). With the
   default bands (HST F775W -> HSC i, sigma_lr ~ 3.8 nJy) the HST noise is ~0.23 sigma_lr per HR
   pixel, inside the linear part of the stretch; a 20th-mag galaxy's HR core maps to ~0.5 and even
   star-like 18th-mag cores stay below ~1.
4. The generator predicts in that scaled space; :func:`postprocess` maps a prediction back to HR nJy
   (``sigma_lr * softening * sinh(scale * y)``).

:func:`prepare_batch` does steps 1-3, :func:`postprocess` step 4. The generator's additive skip is the
bicubic x3 upsampling of the input done in linear units (``inverse`` scaling, upsample, divide by
the pixel-area ratio 9, ``forward`` scaling), so an untrained network starts from the bicubic
baseline and learns the residual.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, InputError
from .scaling import ArcsinhScaling

__all__ = [
    "DCGANConfig",
    "SRGANConfig",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "UNetSRGenerator",
    "PaperSRGenerator",
    "ConditionalDiscriminator",
    "build_generator",
    "build_discriminator",
    "prepare_batch",
    "postprocess",
    "upsample_baseline",
    "count_parameters",
]

#: Largest scaled value :func:`postprocess` inverts (sinh(10 * 8) ~ 3e34 still fits float32).
_MAX_SCALED = 8.0


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DCGANConfig:
    """The unconditional DCGAN of the paper's Fig. 2: noise ``z`` -> a 64x64 HST-like galaxy.

    Attributes
    ----------
    channels : int
        Number of bands ``C`` of the generated image.
    latent_dim : int
        Length of the noise vector ``z``.
    gen_width : int
        Feature maps of the last generator block (``ngf`` of Radford et al.; blocks use 8, 4, 2, 1x).
    disc_width : int
        Feature maps of the first discriminator block (``ndf``).
    image_size : int
        Side of the generated image; only 64 is supported (four x2 up-convolutions from 4x4).
    scaling : ArcsinhScaling
        Stretch of the training images (HR nJy / ``sigma_hr``); values are clipped to [-1, 1]
        to match the Tanh output.
    """

    channels: int = 1
    latent_dim: int = 100
    gen_width: int = 64
    disc_width: int = 64
    image_size: int = 64
    scaling: ArcsinhScaling = field(default_factory=ArcsinhScaling)

    def __post_init__(self):
        if self.image_size != 64:
            raise ConfigError("DCGANConfig.image_size", f"only 64 is supported, got {self.image_size}")
        for name in ("channels", "latent_dim", "gen_width", "disc_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DCGANConfig.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SRGANConfig:
    """Conditional super-resolution GAN: LR ``(C, 22, 22)`` -> HR ``(C, 64, 64)``.

    Attributes
    ----------
    in_channels, out_channels : int
        Bands of the LR input and of the HR output (the paper uses the same bands: 1 or 7).
    architecture : {"unet", "paper"}
        ``unet``: a compact residual U-Net working on the LR grid, then a x3 sub-pixel
        (``upsample="pixelshuffle"``) or transposed-convolution upsampler and two convolutions on the
        HR grid (the default; ~0.42M parameters for one band). ``paper``: the paper's layered generator, the input
        upsampled to 64x64 and passed through strided convolutions (BatchNorm, LeakyReLU) and back
        through transposed convolutions (BatchNorm, ReLU), DCGAN-style.
    base_width : int
        Feature maps at the first level.
    depth : int
        Number of down-sampling levels (U-Net: 22 -> 11 -> 6 for depth 2; paper: 64 -> 32 -> ...).
    blocks : int
        Residual blocks per U-Net level.
    upsample : {"pixelshuffle", "convtranspose"}
        How the U-Net goes from the 22x22 to the 66x66 grid.
    skip : bool
        Add the bicubic baseline (in scaled units, see the module docstring) to the output, so the
        network predicts a residual.
    output_activation : {"none", "tanh"}
        Applied to the network's output before the skip is added (``tanh`` as in the paper).
    disc_width, disc_depth : int
        PatchGAN discriminator: feature maps of the first layer and number of stride-2 layers
        (depth 3 on 64x64 gives an 8x8 map of patch logits).
    disc_norm : {"batch", "instance", "none"}
        Normalisation in the discriminator (BatchNorm as in DCGAN/pix2pix).
    icnr : bool
        ICNR-initialise the convolution before the PixelShuffle (no checkerboard at the start; the
        shipped 1-band models use it, the 7-band one predates it: ``icnr: false``). Initialisation
        only: it does not change how a checkpoint's weights are used.
    condition_upsample : {"bicubic", "nearest"}
        How the LR input is brought to 64x64 for the conditional discriminator and the ``paper``
        generator.
    decoder_upsample : {"to_size", "double"}
        How the U-Net's decoder brings a coarse level back to its skip's grid: ``to_size`` (nearest
        interpolation to the skip's size; 6 -> 11 on a 22 px input is not a uniform x2, so the output
        depends on where a source sits in the cutout: the models shipped before the position-free
        recipe) or ``double`` (nearest x2, cropped to the skip: the same operation at every position,
        so the network is translation-equivariant in steps of ``2**depth`` LR pixels and gives the
        same result on a whole image as on overlapping windows of it).
    padding_mode : {"zeros", "reflect"}
        What the U-Net's 3x3 convolutions see beyond the image edge: ``zeros`` (the shipped models)
        or ``reflect`` (the image mirrored: no boundary for the network to learn an answer to; two
        models trained with it lost the edge ring of bias on pure noise but painted more isolated
        sources there, README "Trust").
    lr_size, hr_size, factor : int
        Grids: ``lr_size * factor - hr_size`` must be even and >= 0 (22 * 3 - 64 = 2: crop 1 px each side).
    scaling : ArcsinhScaling
        Stretch of the sigma_lr-normalised images (module docstring).
    """

    in_channels: int = 1
    out_channels: int = 1
    architecture: Literal["unet", "paper"] = "unet"
    base_width: int = 32
    depth: int = 2
    blocks: int = 1
    upsample: Literal["pixelshuffle", "convtranspose"] = "pixelshuffle"
    skip: bool = True
    output_activation: Literal["none", "tanh"] = "none"
    disc_width: int = 32
    disc_depth: int = 3
    disc_norm: Literal["batch", "instance", "none"] = "batch"
    condition_upsample: Literal["bicubic", "nearest"] = "bicubic"
    icnr: bool = True
    decoder_upsample: Literal["to_size", "double"] = "to_size"
    padding_mode: Literal["zeros", "reflect"] = "zeros"
    lr_size: int = 22
    hr_size: int = 64
    factor: int = 3
    scaling: ArcsinhScaling = field(default_factory=ArcsinhScaling)

    def __post_init__(self):
        if self.in_channels < 1 or self.out_channels < 1:
            raise ConfigError("SRGANConfig", "in_channels and out_channels must be >= 1")
        if self.skip and self.in_channels != self.out_channels:
            raise ConfigError("SRGANConfig.skip", "the additive skip needs in_channels == out_channels")
        extra = self.lr_size * self.factor - self.hr_size
        if extra < 0 or extra % 2:
            raise ConfigError(
                "SRGANConfig", f"lr_size * factor - hr_size must be even and >= 0, got {extra}"
            )
        if self.base_width < 4 or self.depth < 0 or self.blocks < 0:
            raise ConfigError("SRGANConfig", "base_width >= 4, depth >= 0 and blocks >= 0 required")
        if self.architecture == "paper" and self.hr_size % (2 ** max(self.depth, 1)):
            raise ConfigError("SRGANConfig.depth", f"hr_size {self.hr_size} not divisible by 2**depth")
        if self.decoder_upsample not in ("to_size", "double"):
            raise ConfigError("SRGANConfig.decoder_upsample", f"must be to_size or double, got {self.decoder_upsample!r}")
        if self.padding_mode not in ("zeros", "reflect"):
            raise ConfigError("SRGANConfig.padding_mode", f"must be zeros or reflect, got {self.padding_mode!r}")
        if self.disc_depth < 1 or self.hr_size % (2**self.disc_depth):
            raise ConfigError("SRGANConfig.disc_depth", "hr_size must be divisible by 2**disc_depth")

    @property
    def crop(self) -> int:
        """HR pixels cropped on each side after x``factor`` upsampling (1 for 22 -> 66 -> 64)."""
        return (self.lr_size * self.factor - self.hr_size) // 2

    @property
    def area_ratio(self) -> float:
        """LR pixel area over HR pixel area (9): the HR value of a flat surface brightness is LR / 9."""
        return float(self.factor**2)


# ----------------------------------------------------------------------------------------------
# DCGAN (Radford et al. 2016; paper Fig. 2)
# ----------------------------------------------------------------------------------------------
class DCGANGenerator(nn.Module):
    """Noise ``(B, latent_dim)`` -> image ``(B, C, 64, 64)`` in [-1, 1] (scaled units).

    ConvTranspose2d + BatchNorm + ReLU blocks 1 -> 4 -> 8 -> 16 -> 32 -> 64, Tanh output.
    """

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.gen_width
        chans = [cfg.latent_dim, 8 * w, 4 * w, 2 * w, w]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            stride, pad = (1, 0) if i == 0 else (2, 1)
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(w, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(nn.Module):
    """Image ``(B, C, 64, 64)`` -> one real/fake logit per image ``(B,)``.

    Strided Conv2d (+ BatchNorm from the second layer) + LeakyReLU(0.2): 64 -> 32 -> 16 -> 8 -> 4 -> 1.
    """

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.disc_width
        chans = [cfg.channels, w, 2 * w, 4 * w, 8 * w]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(nn.Conv2d(8 * w, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).reshape(image.shape[0])


def _dcgan_init(module: nn.Module) -> None:
    """Radford et al.: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Super-resolution generators
# ----------------------------------------------------------------------------------------------
def upsample_baseline(x: torch.Tensor, *, scaling: ArcsinhScaling, factor: int = 3, crop: int = 1,
                      mode: str = "bicubic") -> torch.Tensor:
    """The interpolation baseline in scaled units: what the skip path adds and what metrics compare to.

    Parameters
    ----------
    x : torch.Tensor
        Scaled LR input ``(B, C, h, w)`` (``prepare_batch`` output).
    scaling : ArcsinhScaling
    factor, crop : int
        Upsampling factor and HR pixels cropped per side (3 and 1 for 22 -> 66 -> 64).
    mode : {"bicubic", "nearest", "bilinear"}

    Returns
    -------
    torch.Tensor
        ``(B, C, h*factor - 2*crop, ...)``: ``forward(interp(inverse(x)) / factor**2)``, i.e. the
        LR surface brightness on the HR grid in HR-pixel units of sigma_lr, re-scaled.
    """
    lin = scaling.inverse(x.clamp(-_MAX_SCALED, _MAX_SCALED))
    kw = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(lin, scale_factor=factor, mode=mode, **kw) / float(factor**2)
    if crop:
        up = up[..., crop:-crop, crop:-crop]
    return scaling.forward(up)


def _condition_upsample(x: torch.Tensor, cfg: SRGANConfig) -> torch.Tensor:
    """LR scaled input -> HR grid (nearest/bicubic on the scaled values, cropped), for conditioning."""
    kw = {} if cfg.condition_upsample == "nearest" else {"align_corners": False}
    up = F.interpolate(x, scale_factor=cfg.factor, mode=cfg.condition_upsample, **kw)
    c = cfg.crop
    return up[..., c:-c, c:-c] if c else up


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, True)
        # Zero-initialised residual branch: every block starts as the identity (stable at higher lr).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


def _icnr_(conv: nn.Conv2d, factor: int) -> None:
    """ICNR initialisation of the convolution before a ``PixelShuffle(factor)`` (Aitken et al. 2017).

    The ``factor**2`` sub-pixel outputs of each feature start with identical weights, so the shuffled
    map starts as a nearest-neighbour upsampling of one convolution: no checkerboard at
    initialisation, which otherwise survives training as a 3-pixel pattern (and as spurious peaks).
    """
    out_c = conv.out_channels // (factor * factor)
    base = torch.empty(out_c, conv.in_channels, *conv.kernel_size)
    nn.init.kaiming_uniform_(base, a=5 ** 0.5)  # nn.Conv2d's own default
    with torch.no_grad():
        conv.weight.copy_(base.repeat_interleave(factor * factor, dim=0))
        if conv.bias is not None:
            b = torch.empty(out_c).uniform_(-1e-3, 1e-3)
            conv.bias.copy_(b.repeat_interleave(factor * factor))


class _SkipMixin:
    cfg: SRGANConfig

    def _finish(self, out: torch.Tensor, x: torch.Tensor, crop: int | None = None) -> torch.Tensor:
        if self.cfg.output_activation == "tanh":
            out = torch.tanh(out)
        if self.cfg.skip:
            out = out + upsample_baseline(x, scaling=self.cfg.scaling, factor=self.cfg.factor,
                                          crop=self.cfg.crop if crop is None else crop, mode="bicubic")
        return out


class UNetSRGenerator(_SkipMixin, nn.Module):
    """Compact residual U-Net on the LR grid, x3 upsampling, two HR convolutions, crop 66 -> 64.

    Widths are ``base_width * (1, 2, 2, ...)`` (capped at 2x to keep the model small); the last
    convolution starts at zero, so an untrained generator with ``skip=True`` returns the bicubic
    baseline exactly.
    """

    def __init__(self, cfg: SRGANConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.base_width
        widths = [w * min(2**i, 2) for i in range(cfg.depth + 1)]
        act = lambda: nn.LeakyReLU(0.2, True)  # noqa: E731
        self.head = nn.Conv2d(cfg.in_channels, w, 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[_ResBlock(widths[i]) for _ in range(cfg.blocks)])
                                 for i in range(cfg.depth))
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1), act())
                                  for i in range(cfg.depth))
        self.mid = nn.Sequential(*[_ResBlock(widths[-1]) for _ in range(max(cfg.blocks, 1))])
        self.up = nn.ModuleList(nn.Sequential(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1), act())
                                for i in range(cfg.depth))
        self.fuse = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * widths[i], widths[i], 1), act(),
                                                *[_ResBlock(widths[i]) for _ in range(cfg.blocks)])
                                  for i in range(cfg.depth))
        f = cfg.factor
        if cfg.upsample == "pixelshuffle":
            self.upsampler = nn.Sequential(nn.Conv2d(w, (w // 2) * f * f, 3, padding=1), nn.PixelShuffle(f), act())
            if cfg.icnr:
                _icnr_(self.upsampler[0], f)
        else:
            self.upsampler = nn.Sequential(nn.ConvTranspose2d(w, w // 2, f, stride=f), act())
        self.hr = nn.Sequential(nn.Conv2d(w // 2, w // 2, 3, padding=1), act())
        self.tail = nn.Conv2d(w // 2, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)
        for conv in self.modules():  # the padding of every 3x3 convolution (1x1 ones have none)
            if isinstance(conv, nn.Conv2d) and conv.padding != (0, 0):
                conv.padding_mode = cfg.padding_mode

    def forward(self, x: torch.Tensor, *, crop: bool = True) -> torch.Tensor:
        """``(N, C, h, w)`` scaled LR -> ``(N, C, factor*h - 2*crop, factor*w - 2*crop)`` scaled HR.

        Any ``h, w`` works (the network is fully convolutional); ``crop=False`` keeps the whole
        ``factor*h x factor*w`` grid (whole-image inference, :meth:`Enhancer.enhance_plane`).
        """
        h = self.head(x)
        skips = []
        for enc, down in zip(self.enc, self.down):
            h = enc(h)
            skips.append(h)
            h = down(h)
        h = self.mid(h)
        for i in reversed(range(self.cfg.depth)):
            s = skips[i]
            if self.cfg.decoder_upsample == "double":
                h = F.interpolate(h, scale_factor=2, mode="nearest")[..., :s.shape[-2], :s.shape[-1]]
            else:
                h = F.interpolate(h, size=s.shape[-2:], mode="nearest")
            h = self.up[i](h)
            h = self.fuse[i](torch.cat([h, s], dim=1))
        h = self.hr(self.upsampler(h))
        c = self.cfg.crop if crop else 0
        if c:
            h = h[..., c:-c, c:-c]
        return self._finish(self.tail(h), x, crop=c)


class PaperSRGenerator(_SkipMixin, nn.Module):
    """The paper's layered generator: input upsampled to 64x64, strided Conv2d + BatchNorm + LeakyReLU
    down to ``64 / 2**depth``, ConvTranspose2d + BatchNorm + ReLU back to 64, a 3x3 output convolution.

    Use ``output_activation="tanh"`` and ``skip=False`` for the paper's plain DCGAN-style variant.
    """

    def __init__(self, cfg: SRGANConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.base_width
        widths = [w * 2**i for i in range(cfg.depth + 1)]
        self.head = nn.Sequential(nn.Conv2d(cfg.in_channels, w, 3, padding=1), nn.LeakyReLU(0.2, True))
        down: list[nn.Module] = []
        for i in range(cfg.depth):
            down += [nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(widths[i + 1]),
                     nn.LeakyReLU(0.2, True)]
        up: list[nn.Module] = []
        for i in reversed(range(cfg.depth)):
            up += [nn.ConvTranspose2d(widths[i + 1], widths[i], 4, 2, 1, bias=False), nn.BatchNorm2d(widths[i]),
                   nn.ReLU(True)]
        self.body = nn.Sequential(*down, *up)
        self.tail = nn.Conv2d(w, cfg.out_channels, 3, padding=1)
        _dcgan_init(self)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tail(self.body(self.head(_condition_upsample(x, self.cfg))))
        return self._finish(h, x)


class ConditionalDiscriminator(nn.Module):
    """PatchGAN on an HR image concatenated with its (upsampled) LR input.

    ``forward(image_hr, image_lr)`` with scaled ``(B, C, 64, 64)`` and ``(B, C, 22, 22)`` returns patch
    logits ``(B, 1, 64 / 2**disc_depth, ...)``.
    """

    def __init__(self, cfg: SRGANConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.disc_width
        cin = cfg.out_channels + cfg.in_channels
        layers: list[nn.Module] = []
        for i in range(cfg.disc_depth):
            cout = w * 2 ** min(i, 3)
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1, bias=(i == 0 or cfg.disc_norm == "none")))
            if i > 0 and cfg.disc_norm == "batch":
                layers.append(nn.BatchNorm2d(cout))
            elif i > 0 and cfg.disc_norm == "instance":
                layers.append(nn.InstanceNorm2d(cout, affine=True))
            layers.append(nn.LeakyReLU(0.2, True))
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, image_hr: torch.Tensor, image_lr: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([image_hr, _condition_upsample(image_lr, self.cfg)], dim=1))


# ----------------------------------------------------------------------------------------------
# Builders and the normalisation contract
# ----------------------------------------------------------------------------------------------
def build_generator(cfg: DCGANConfig | SRGANConfig) -> nn.Module:
    """The generator described by ``cfg`` (freshly initialised, CPU, train mode).

    Parameters
    ----------
    cfg : DCGANConfig or SRGANConfig

    Returns
    -------
    torch.nn.Module
        :class:`DCGANGenerator`, :class:`UNetSRGenerator` or :class:`PaperSRGenerator`.
    """
    if isinstance(cfg, DCGANConfig):
        return DCGANGenerator(cfg)
    if isinstance(cfg, SRGANConfig):
        return UNetSRGenerator(cfg) if cfg.architecture == "unet" else PaperSRGenerator(cfg)
    raise ConfigError("model", f"expected DCGANConfig or SRGANConfig, got {type(cfg).__name__}")


def build_discriminator(cfg: DCGANConfig | SRGANConfig) -> nn.Module:
    """The discriminator described by ``cfg``: :class:`DCGANDiscriminator` or :class:`ConditionalDiscriminator`."""
    if isinstance(cfg, DCGANConfig):
        return DCGANDiscriminator(cfg)
    if isinstance(cfg, SRGANConfig):
        return ConditionalDiscriminator(cfg)
    raise ConfigError("model", f"expected DCGANConfig or SRGANConfig, got {type(cfg).__name__}")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _as_tensor(a, name: str, device=None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a
    else:
        arr = np.asarray(a)
        if arr.dtype == object:  # fixed-size-list columns from Ray Data arrive as object arrays
            arr = np.stack(list(arr))
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t.to(device=device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise InputError(name, "contains NaN or infinite values")
    return t


def _sigma_tensor(sigma_lr, n: int, c: int, device) -> torch.Tensor:
    s = _as_tensor(sigma_lr, "sigma_lr", device)
    if s.ndim == 1 and s.shape[0] == n and c == 1:
        s = s[:, None]
    if tuple(s.shape) != (n, c):
        raise InputError("sigma_lr", f"expected shape ({n}, {c}) (per image and band), got {tuple(s.shape)}")
    if not (s > 0).all():
        raise InputError("sigma_lr", "noise sigma must be > 0 for every image and band")
    return s[:, :, None, None]


def prepare_batch(image_lr, image_hr, sigma_lr, scaling: ArcsinhScaling, *, device=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Network input and target from nJy images (the normalisation contract, module docstring).

    Parameters
    ----------
    image_lr : array-like ``(N, C, 22, 22)``
        LR images in nJy per LR pixel.
    image_hr : array-like ``(N, C, 64, 64)`` or None
        HR images in nJy per HR pixel (None at inference).
    sigma_lr : array-like ``(N, C)``
        Noise sigma per LR pixel (nJy) of each image and band.
    scaling : ArcsinhScaling
    device : str or torch.device, optional

    Returns
    -------
    x : torch.Tensor
        ``scaling.forward(image_lr / sigma_lr)``, float32.
    y : torch.Tensor or None
        ``scaling.forward(image_hr / sigma_lr)``, float32 (None when ``image_hr`` is None).
    """
    lr = _as_tensor(image_lr, "image_lr", device)
    if lr.ndim != 4:
        raise InputError("image_lr", f"expected (N, C, H, W), got shape {tuple(lr.shape)}")
    s = _sigma_tensor(sigma_lr, lr.shape[0], lr.shape[1], lr.device)
    x = scaling.forward(lr / s)
    if image_hr is None:
        return x, None
    hr = _as_tensor(image_hr, "image_hr", lr.device)
    if hr.ndim != 4 or hr.shape[:2] != lr.shape[:2]:
        raise InputError("image_hr", f"shape {tuple(hr.shape)} does not match image_lr {tuple(lr.shape)}")
    return x, scaling.forward(hr / s)


def postprocess(y_pred: torch.Tensor, sigma_lr, scaling: ArcsinhScaling) -> torch.Tensor:
    """HR nJy per HR pixel from a scaled prediction: ``sigma_lr * scaling.inverse(y_pred)``.

    Parameters
    ----------
    y_pred : torch.Tensor ``(N, C, H, W)``
        Generator output (scaled units); values are clipped to +-8 before inversion so that an
        untrained network cannot overflow float32.
    sigma_lr : array-like ``(N, C)``
        The same sigmas that :func:`prepare_batch` divided by.
    scaling : ArcsinhScaling

    Returns
    -------
    torch.Tensor
        ``(N, C, H, W)`` in nJy per HR pixel.
    """
    s = _sigma_tensor(sigma_lr, y_pred.shape[0], y_pred.shape[1], y_pred.device)
    return scaling.inverse(y_pred.clamp(-_MAX_SCALED, _MAX_SCALED)) * s

