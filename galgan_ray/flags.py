"""Bit flags, defined once (photutils' ``FlagDefinition`` idea, sep's ``OBJ_MERGED`` constants).

Every catalog ``flags`` column and every per-cutout flag uses these bits. ``describe_flags``
turns a value back into names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FlagDefinition", "FLAGS", "flag_bit", "describe_flags", "without_flags"]


@dataclass(frozen=True)
class FlagDefinition:
    """One flag: its bit number, its name and what it means."""

    bit: int
    name: str
    description: str

    @property
    def value(self) -> int:
        return 1 << self.bit


FLAGS: tuple[FlagDefinition, ...] = (
    FlagDefinition(0, "EDGE", "source or cutout touches the image edge; the stamp was padded"),
    FlagDefinition(1, "NONFINITE", "non-finite pixels were found (and masked) in the input"),
    FlagDefinition(2, "MASKED", "masked pixels inside the footprint"),
    FlagDefinition(3, "BLENDED", "the low-resolution footprint holds more than one peak"),
    FlagDefinition(4, "SATURATED", "saturated or bad pixels near the peak"),
    FlagDefinition(5, "FIT_FAILED", "the Gaussian-mixture fit did not converge, or a flux is unconstrained"),
    FlagDefinition(6, "FIT_SHIFTED", "the fitted centre moved to the limit of the allowed shift"),
    FlagDefinition(7, "LOW_SNR", "significance below the detection threshold after the fit"),
    FlagDefinition(8, "PEAK_MERGED", "peaks closer than the minimum separation were merged"),
    FlagDefinition(9, "NOT_PRIMARY", "source lies in the tile's overlap border, owned by a neighbour"),
    FlagDefinition(10, "STAR", "classified as a point source (CLASS_STAR above the cut)"),
    FlagDefinition(11, "ENHANCE_SKIPPED", "no enhanced image was made for this footprint"),
    FlagDefinition(12, "UNSUPPORTED", "the low-resolution pixels do not support this child: its fitted flux is "
                                      "below measure.support_snr times its error in the footprint's joint fit "
                                      "(measure.support_snr_added for DEBLEND_ADDED children); left "
                                      "out of the catalog unless keep_unsupported"),
    FlagDefinition(13, "LOW_RES_PEAK", "a low-resolution peak that no enhanced child reproduces (none within "
                                       "half the LR PSF FWHM), kept as a child: enhancement adds children, it "
                                       "does not remove what the original pixels show"),
    FlagDefinition(14, "TEMPLATE_FAILED", "template photometry: the child's flux is unconstrained (its template "
                                          "is empty or degenerate with a sibling's, or the solve failed); "
                                          "templateFlux is NaN"),
    FlagDefinition(15, "BRIGHT_OBJECT", "within a PSF FWHM of the survey's bright-star mask (HSC/Rubin "
                                        "BRIGHT_OBJECT or SPIKE mask plane): a star's halo, ghosts or spikes may "
                                        "bias the flux or be the source"),
    FlagDefinition(16, "NO_DATA", "within a PSF FWHM of pixels with no data (NO_DATA or UNMASKEDNAN mask plane: "
                                  "outside the survey's coverage); the flux may miss light"),
    FlagDefinition(17, "DEBLEND_ADDED", "not an object of the plain low-resolution detection (5 sigma matched "
                                        "filter, SExtractor-style deblending; matched one to one within "
                                        "measure.added_radius_arcsec): a source only deblending finds; it needs a "
                                        "joint-fit S/N of measure.support_snr_added"),
    FlagDefinition(18, "PSF_BROADER", "the input's PSF (a band of it) is broader than the model's by more than "
                                      "enhance.PSF_BROADER_WARN (10%): it cannot be matched to the model's, which "
                                      "was not trained for such seeing; children and fluxes are less reliable"),
)

_BY_NAME = {f.name: f for f in FLAGS}
assert len({f.bit for f in FLAGS}) == len(FLAGS), "flag bits must be unique"


def flag_bit(name: str) -> int:
    """Return the integer value (``1 << bit``) of the flag called ``name``."""
    try:
        return _BY_NAME[name].value
    except KeyError:
        raise KeyError(f"unknown flag {name!r}; known: {sorted(_BY_NAME)}") from None


def describe_flags(value: int) -> list[str]:
    """Return the names of the flags set in ``value``."""
    return [f.name for f in FLAGS if int(value) & f.value]


def without_flags(flags, names) -> np.ndarray:
    """Boolean mask of the rows whose ``flags`` carry none of the flags ``names`` (all rows when empty)."""
    bad = 0
    for name in names:
        bad |= flag_bit(name)
    return (np.asarray(flags).astype(np.int64) & bad) == 0
