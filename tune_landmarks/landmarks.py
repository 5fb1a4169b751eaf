"""Landmark catalogues. Everything downstream names landmarks by symbol, never by position."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Landmark:
    symbol: str
    title: str
    group: str  # skeletal, dental or soft-tissue


_S, _D, _T = "skeletal", "dental", "soft-tissue"

# The Aariz authors' order (their JSON files and their loader use it).
AARIZ: tuple[Landmark, ...] = (
    Landmark("A", "A-point", _S),
    Landmark("ANS", "Anterior Nasal Spine", _S),
    Landmark("B", "B-point", _S),
    Landmark("Me", "Menton", _S),
    Landmark("N", "Nasion", _S),
    Landmark("Or", "Orbitale", _S),
    Landmark("Pog", "Pogonion", _S),
    Landmark("PNS", "Posterior Nasal Spine", _S),
    Landmark("Pn", "Pronasale", _T),
    Landmark("R", "Ramus", _S),
    Landmark("S", "Sella", _S),
    Landmark("Ar", "Articulare", _S),
    Landmark("Co", "Condylion", _S),
    Landmark("Gn", "Gnathion", _S),
    Landmark("Go", "Gonion", _S),
    Landmark("Po", "Porion", _S),
    Landmark("LPM", "Lower 2nd PM Cusp Tip", _D),
    Landmark("LIT", "Lower Incisor Tip", _D),
    Landmark("LMT", "Lower Molar Cusp Tip", _D),
    Landmark("UPM", "Upper 2nd PM Cusp Tip", _D),
    Landmark("UIA", "Upper Incisor Apex", _D),
    Landmark("UIT", "Upper Incisor Tip", _D),
    Landmark("UMT", "Upper Molar Cusp Tip", _D),
    Landmark("LIA", "Lower Incisor Apex", _D),
    Landmark("Li", "Labrale inferius", _T),
    Landmark("Ls", "Labrale superius", _T),
    Landmark("N`", "Soft Tissue Nasion", _T),
    Landmark("Pog`", "Soft Tissue Pogonion", _T),
    Landmark("Sn", "Subnasale", _T),
)

_BY_SYMBOL = {lm.symbol: lm for lm in AARIZ}

# ISBI 2015 landmarks 1..19, named by their Aariz symbol.
ISBI2015: tuple[Landmark, ...] = tuple(
    _BY_SYMBOL[s]
    for s in ("S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT", "Ls", "Li", "Sn",
              "Pog`", "PNS", "ANS", "Ar")
)

# The twelve landmarks the hand-tuned workflow masks the loss to (worst on Aariz).
WORKFLOW_DIFFICULT: tuple[str, ...] = ("UMT", "UPM", "R", "Ar", "Go", "LMT", "LPM", "Or", "Co", "PNS", "Po", "ANS")

CATALOGUES: dict[str, tuple[Landmark, ...]] = {"aariz": AARIZ, "isbi": ISBI2015}


def symbols(catalogue: tuple[Landmark, ...]) -> list[str]:
    return [lm.symbol for lm in catalogue]


def title_of(symbol: str) -> str:
    return _BY_SYMBOL[symbol].title


def parse_symbols(text: str | list[str] | tuple[str, ...], known: list[str], what: str = "--difficult") -> list[str]:
    """Parse 'UMT,UPM,...' (or a list) into symbols, failing on any symbol not in `known`."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    unknown = [s for s in items if s not in known]
    if unknown:
        raise ValueError(f"{what}: unknown landmark symbol(s) {', '.join(unknown)}; known: {', '.join(known)}")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise ValueError(f"{what}: landmark symbol(s) given twice: {', '.join(dup)}")
    return items
