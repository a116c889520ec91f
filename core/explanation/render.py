"""What the terminal view and the HTML page both draw: each text cut into words and
the gaps between them, each word with its score scaled to [-1, 1] within its text."""

from __future__ import annotations


def segments(rec: dict) -> list[tuple[str, float | None, float | None]]:
    """(text, weight in [-1, 1] or None for a gap, raw score or None) in reading order;
    a truncated text's tail shows as an unscored gap."""
    text = rec["text"]
    scale = max((abs(w["score"]) for w in rec["words"]), default=0.0) or 1.0
    out: list[tuple[str, float | None, float | None]] = []
    pos = 0
    for w in rec["words"]:
        if w["start"] > pos:
            out.append((text[pos:w["start"]], None, None))
        out.append((text[w["start"]:w["end"]], w["score"] / scale, w["score"]))
        pos = max(pos, w["end"])
    if pos < len(text):
        out.append((text[pos:], None, None))
    return out


def top_words(rec: dict, n: int = 3) -> list[dict]:
    """The n words with the highest scores (towards the explained class)."""
    return sorted(rec["words"], key=lambda w: -w["score"])[:n]
