"""How much to remove (:class:`Budget`): a fraction of the removable blocks, a count of them, or a fraction of the
model's parameters; parsed once at the boundary, with an error that shows the three forms."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LayerlabError

__all__ = ["Budget", "parse_budget"]

FORMS = "a fraction of the blocks 0 < B < 1 (0.25), a count of blocks (2) or a fraction of the parameters (params:0.25)"


@dataclass(frozen=True)
class Budget:
    """``kind`` is ``"blocks"`` or ``"params"``; ``value`` a fraction in (0, 1), or (blocks only) a whole count."""

    kind: str
    value: float | int

    @property
    def label(self) -> str:
        """The budget as the user writes it (the table's ``budget`` column and part of a job's key)."""
        return f"params:{self.value:g}" if self.kind == "params" else f"{self.value:g}"

    def blocks(self, total: int) -> int:
        """The number of blocks a blocks budget removes out of ``total`` (a fraction rounds half up, at least 1)."""
        if self.kind != "blocks":
            raise LayerlabError(f"budget {self.label!r} counts parameters, not blocks")
        n = int(self.value) if isinstance(self.value, int) else max(1, math.floor(self.value * total + 0.5))
        if n > total:
            raise LayerlabError(f"budget {self.label!r} asks for {n} blocks but the model has {total} removable "
                                f"blocks; ask for at most {total} (or a fraction such as 0.5)")
        return n

    def fraction(self, total: int) -> float:
        """The budget as a fraction: of the blocks (``total`` of them) or of the parameters."""
        return float(self.value) if self.kind == "params" or isinstance(self.value, float) else self.value / total


def parse_budget(budget: str | float | int | Budget) -> Budget:
    """``0.25`` or ``"0.25"`` -> a quarter of the blocks; ``2`` or ``"2"`` -> two blocks; ``"params:0.25"`` -> blocks
    until a quarter of the parameters is gone.

    >>> parse_budget("params:0.25").label, parse_budget(2).label, parse_budget("0.5").kind
    ('params:0.25', '2', 'blocks')
    """
    if isinstance(budget, Budget):
        return budget
    text = str(budget).strip()
    kind, _, value = text.rpartition(":") if ":" in text else ("blocks", "", text)
    if kind not in ("blocks", "params"):
        raise LayerlabError(f"budget {text!r}: unknown kind {kind!r}; write {FORMS}")
    try:
        number: float | int = int(value) if value.isdigit() and not isinstance(budget, float) else float(value)
    except ValueError:
        raise LayerlabError(f"budget {text!r} is not a number; write {FORMS}") from None
    if isinstance(number, int) and kind == "blocks":
        if number < 1:
            raise LayerlabError(f"budget {text!r}: a count of blocks must be at least 1; write {FORMS}")
        return Budget("blocks", number)
    if not 0 < number < 1:
        raise LayerlabError(f"budget {text!r}: a fraction must lie strictly between 0 and 1; write {FORMS}")
    return Budget(kind, float(number))
