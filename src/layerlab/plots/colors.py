"""One colour per model, run or training method, the same in every figure.

A reader who has learnt that TrAct is red in one figure should find it red in the next. Every figure that draws
series per model, run, method or training category takes its colours from here, never from its own palette:

* a fixed table (:data:`METHOD_COLORS`) for the names of training methods, optimisers and reference models that the
  zoos, the TrAct study and the transfer analyses use, so ``adam`` or ``tract`` has one colour everywhere;
* a compound name takes the colour of the method token in it: ``resnet-adam`` and ``vit-adam`` are both Adam's,
  ``pgd-linf-8`` is adversarial training's, ``adam-tract-e6-s0`` is TrAct's (training methods before the reference
  recipes, those before optimisers: see :data:`METHOD_COLORS`);
* any other name gets a colour of :data:`PALETTE` chosen by a CRC-32 of the name (not Python's ``hash()``, which is
  salted per process), so it keeps it across figures and processes.

:func:`color_of` is the colour of one name; :func:`colors_for` the colours of all names of one figure, where no two
names share a colour: a second name of the same method gets a darker (then lighter) shade of the method's colour,
the name that is the method itself keeping it, and unknown names whose hashes collide move on through the palette
(in sorted order, so the result does not depend on the order the names come in). Names are compared lower-case
with ``_`` and spaces as ``-`` (``"label noise"`` is ``label-noise``). Pure functions; no matplotlib state.
"""
from __future__ import annotations

import colorsys
import re
import zlib
from collections.abc import Iterable
from itertools import chain, count

from matplotlib.colors import to_hex, to_rgb

__all__ = ["METHOD_COLORS", "PALETTE", "color_of", "colors_for", "method_of"]

#: Colour of each known name, in priority order: a compound name takes the first entry any of its tokens names.
#: Distinct entries have distinct colours (Paul Tol's bright, vibrant and muted schemes, readable on white).
METHOD_COLORS: dict[str, str] = {
    # training methods
    "tract": "#cc3311",
    "adversarial": "#ee3377",
    "label-noise": "#332288",
    "improved": "#882255",
    "label-smoothing": "#6699cc",
    "ema": "#aa4499",
    "augmentation": "#228833",
    "augmix": "#117733",
    "randaugment": "#44aa99",
    "autoaugment": "#999933",
    "trivialaugment": "#33bbee",
    "cropflip": "#88ccee",
    "mixup": "#ccbb44",
    "cutmix": "#bb5566",
    # transfer (invariance under finetuning)
    "pretrained": "#4477aa",
    "finetuned": "#009988",
    "scratch": "#ee6677",
    # the reference recipes
    "baseline": "#555555",
    "vanilla": "#999999",
    # optimisers
    "sgd": "#0077bb",
    "adam": "#ee7733",
    "adamw": "#997700",
    "optimizer": "#ddaa33",
    # block-removal criteria (layerlab prune)
    "criticality": "#7b2d8b",
    "block-influence": "#1a9850",
    "angular": "#f46d43",
    "random": "#777777",
    "magnitude": "#3288bd",
}

#: Other spellings of a table entry.
ALIASES: dict[str, str] = {"pgd": "adversarial", "adv": "adversarial",
                           "aug": "augmentation", "pt": "pretrained", "ft": "finetuned", "optimiser": "optimizer"}

#: Colours for names not in the table (matplotlib's tab20 less its greys), none of them a table colour.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
    "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5",
)

_TOKEN = re.compile(r"[^a-z0-9]+")


def _normal(name: object) -> str:
    return re.sub(r"[\s_]+", "-", str(name).strip().lower())


def method_of(name: object) -> str | None:
    """The table entry whose colour ``name`` takes (the name itself, an alias, or the first of its tokens in the
    table's priority order), or ``None`` for a name that names no known method."""
    norm = _normal(name)
    if norm in METHOD_COLORS or norm in ALIASES:
        return ALIASES.get(norm, norm)
    tokens = [t for t in _TOKEN.split(norm) if t]
    runs = {"-".join(tokens[i:j]) for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1)}
    found = {ALIASES.get(r, r) for r in runs} & METHOD_COLORS.keys()
    return next((k for k in METHOD_COLORS if k in found), None)


def _hashed(name: object) -> int:
    """The stable palette index of an unknown name (CRC-32: the same in every process)."""
    return zlib.crc32(_normal(name).encode("utf-8")) % len(PALETTE)


def color_of(name: object) -> str:
    """The colour (``#rrggbb``) of one model, run, method or category name, the same in every figure."""
    method = method_of(name)
    return METHOD_COLORS[method] if method else PALETTE[_hashed(name)]


def _shade(colour: str, k: int) -> str:
    """The k-th shade of ``colour`` (k = 1..4): darker, lighter, darker still, lighter still."""
    mix, toward = 0.35 * ((k + 1) // 2), (0.0 if k % 2 else 1.0)
    return to_hex([c + (toward - c) * mix for c in to_rgb(colour)])


def _spare(k: int) -> str:
    """The k-th colour beyond the palette, for figures with more unknown names than it has (golden-ratio hues)."""
    return to_hex(colorsys.hsv_to_rgb((0.11 + 0.618034 * k) % 1.0, 0.55 + 0.3 * (k % 2), 0.85 - 0.25 * (k % 3 == 2)))


def colors_for(names: Iterable[object]) -> dict[str, str]:
    """The colour of each distinct name (as ``str``, in first-seen order) for one figure: :func:`color_of`'s, except
    where two names would share one. Then, of the names of one method, the method's own name (else the first in
    sorted order) keeps its colour and the others take its shades; of unknown names, the first in sorted order keeps
    its palette colour and the others move on to the next free one."""
    order = list(dict.fromkeys(str(n) for n in names))
    known = {n: m for n in order if (m := method_of(n))}
    used = {METHOD_COLORS[m] for m in known.values()}  # every method present keeps its own colour
    out: dict[str, str] = {}

    def free(candidates: Iterable[str | None]) -> str:
        colour = next(c for c in chain(candidates, PALETTE, map(_spare, count())) if c and c not in used)
        used.add(colour)
        return colour

    for method in dict.fromkeys(known.values()):
        own = {method, *(a for a, m in ALIASES.items() if m == method)}
        first, *rest = sorted((n for n in known if known[n] == method), key=lambda n: (_normal(n) not in own, n))
        out[first] = METHOD_COLORS[method]
        for n in rest:
            out[n] = free(_shade(METHOD_COLORS[method], k) for k in range(1, 5))
    for n in sorted(n for n in order if n not in known):
        out[n] = free(PALETTE[(_hashed(n) + k) % len(PALETTE)] for k in range(len(PALETTE)))
    return {n: out[n] for n in order}
