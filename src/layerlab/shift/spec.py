"""What a shift is and how it is written: :class:`Shift`, :func:`parse_shift`, :func:`parse_shifts`.

A shift is written ``NAME:SEVERITY`` (``gaussian-noise:3``, ``pgd-linf:2``) or ``clean``. A corruption's severity
is an integer 0..5 (0 is the identity: the clean images); a PGD attack's is its budget eps in 1/255 units, for
``pgd-l2`` too (eps_l2 = EPS / 255 in the L2 norm of the [0, 1] image).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SpecError
from ..registry import close_names, did_you_mean
from .corruptions import CORRUPTIONS

__all__ = ["ADVERSARIAL", "SEVERITIES", "Shift", "known_shifts", "parse_shift", "parse_shifts"]

#: the adversarial shifts and the norm each attacks in
ADVERSARIAL = {"pgd-linf": "linf", "pgd-l2": "l2"}
#: a corruption's severities besides 0 (the identity)
SEVERITIES = (1, 2, 3, 4, 5)
_FORMAT = ("write a shift as NAME:SEVERITY, e.g. 'gaussian-noise:3' (corruption severity 0..5) or 'pgd-linf:2' "
           "(eps in 1/255), or 'clean'")


def known_shifts() -> list[str]:
    """Every shift name: clean, the corruptions, the attacks."""
    return ["clean", *CORRUPTIONS.names(), *ADVERSARIAL]


def _number(value: float) -> str:
    """A severity as written: 3.0 -> '3', 2.5 -> '2.5'."""
    text = repr(float(value))
    return text.removesuffix(".0")


def _unknown(name: str) -> SpecError:
    known = known_shifts()
    return SpecError(f"unknown shift {name!r}{did_you_mean(close_names(name, known, n=2))}; known: {', '.join(known)}")


@dataclass(frozen=True)
class Shift:
    """A distribution shift: ``clean``, a corruption at severity 0..5, or a PGD attack with budget eps (1/255)."""

    name: str
    severity: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", _check(self.name, self.severity))

    def __str__(self) -> str:
        return "clean" if self.name == "clean" else f"{self.name}:{_number(self.severity)}"

    @property
    def clean(self) -> bool:
        """True where the images are left as they are (``clean``, or a corruption at severity 0)."""
        return self.name == "clean" or (self.name in CORRUPTIONS and self.severity == 0)

    @property
    def adversarial(self) -> bool:
        """True for the PGD attacks (computed against a model)."""
        return self.name in ADVERSARIAL


def _check(name: str, severity: float) -> float:
    """``severity`` as a float when it suits ``name``, else a SpecError saying what is allowed."""
    try:
        value = float(severity)
    except (TypeError, ValueError):
        raise SpecError(f"shift {name!r}: severity must be a number, got {severity!r}") from None
    text, got = f"{name}:{_number(value)}", _number(value)
    if name == "clean":
        if value != 0:
            raise SpecError(f"shift {text!r}: clean takes no severity; write 'clean'")
    elif name in CORRUPTIONS:
        if not (value.is_integer() and 0 <= value <= SEVERITIES[-1]):
            raise SpecError(f"shift {text!r}: a corruption's severity must be an integer 0..{SEVERITIES[-1]} "
                            f"(0 = clean), got {got}")
    elif name in ADVERSARIAL:
        if not (math.isfinite(value) and 0 < value <= 255):
            raise SpecError(f"shift {text!r}: a PGD budget eps (in 1/255 units) must be > 0 and at most 255, "
                            f"got {got}")
    else:
        raise _unknown(name)
    return value


def parse_shift(text: str | Shift) -> Shift:
    """``"clean"`` or ``"NAME:SEVERITY"`` as a :class:`Shift` (a Shift is returned as is).

    >>> parse_shift("gaussian-noise:3"), str(parse_shift("pgd-l2:0.5"))
    (Shift(name='gaussian-noise', severity=3.0), 'pgd-l2:0.5')
    """
    if isinstance(text, Shift):
        return text
    if not isinstance(text, str):
        raise SpecError(f"shift: expected a string such as 'contrast:2', got {type(text).__name__}")
    name, colon, severity = text.strip().partition(":")
    name = name.strip().lower().replace("_", "-")
    if name == "clean" and not colon:
        return Shift("clean")
    if name not in known_shifts():
        raise _unknown(name)
    if not colon or not severity.strip():
        raise SpecError(f"shift {text!r}: the severity is missing; {_FORMAT}")
    try:
        value = float(severity)
    except ValueError:
        raise SpecError(f"shift {text!r}: severity {severity.strip()!r} is not a number; {_FORMAT}") from None
    return Shift(name, value)


def parse_shifts(texts: Iterable[str | Shift] | str | Shift | None) -> list[Shift]:
    """The shifts to measure under: clean first, always; each once, in the order given; ``NAME:0`` is clean.

    >>> [str(s) for s in parse_shifts(["contrast:2", "contrast:0", "pgd-linf:2", "contrast:2"])]
    ['clean', 'contrast:2', 'pgd-linf:2']
    """
    if texts is None:
        texts = []
    elif isinstance(texts, (str, Shift)):
        texts = [texts]
    out = [Shift("clean")]
    for text in texts:
        shift = parse_shift(text)
        shift = Shift("clean") if shift.clean else shift
        if shift not in out:
            out.append(shift)
    return out
