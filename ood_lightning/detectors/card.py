"""What the detector table (``docs/detectors.md``, written by :mod:`.table`) says about a detector:
declared beside its class, so the page cannot drift from the code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    label: str  #: the name in tables, e.g. "ASH-P/B/S"
    paper: str  #: authors, venue and year
    needs: str  #: what it reads (logits, features, the head, the inputs) and whether it fits
    defaults: str  #: our defaults and where they come from (the paper, the authors' code, OpenOOD)
