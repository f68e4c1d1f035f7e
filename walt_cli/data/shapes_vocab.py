"""The words of the `shapes` captions, without torch: what a model trained on shapes knows.

walt_cli/data/shapes.py draws from these tables; `walt sample --help` lists them and the
generation pipeline warns about prompt words outside them (a bundle records its vocabulary in
walt_bundle.json), so this module must stay cheap to import.
"""

from __future__ import annotations

import math
import re

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 205, 215),
}
BACKGROUNDS = {
    "black": (12, 12, 12),
    "gray": (110, 110, 110),
    "navy": (20, 30, 75),
    "beige": (225, 215, 185),
}
# Unit vectors in image coordinates (x right, y down).
DIRECTIONS = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}
SPEEDS = {"slowly": 0.25, "quickly": 0.6}  # distance over 16 frames, in frame heights
SIZES = {"small": 0.08, "": 0.12, "large": 0.18}  # radius in frame heights ("" is medium, unnamed)
# The caption template's own words: "a|an <size> <colour> <shape> moving <direction> <speed>
# [and ...] on a <background> background".
GLUE = ("a", "an", "moving", "and", "on", "background")


def vocabulary() -> dict[str, list[str]]:
    """The caption words by category (what walt_bundle.json records as `vocabulary`)."""
    return {
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "directions": list(DIRECTIONS),
        "speeds": list(SPEEDS),
        "sizes": [s for s in SIZES if s],
        "backgrounds": list(BACKGROUNDS),
        "words": list(GLUE),
    }


def describe(vocab: dict[str, list[str]] | None = None) -> str:
    """One line per category, for help texts."""
    vocab = vocab or vocabulary()
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in vocab.items() if k != "words")


_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def unknown_words(prompt: str, vocab: dict[str, list[str]]) -> list[str]:
    """The words of `prompt` (lower-cased, punctuation dropped; "up-left" is one word) that no
    category of `vocab` holds, in order of first appearance."""
    known = {w for words in vocab.values() for w in words}
    out: list[str] = []
    for word in _WORD.findall(prompt.lower()):
        if word not in known and word not in out:
            out.append(word)
    return out
