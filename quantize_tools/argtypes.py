"""What the command lines share: argparse types that check ranges, and the help formatter.

Errors come out as argparse's own (``--flag: must be ..., got ...``), before any work starts.
"""
from __future__ import annotations

import argparse
import math
from fractions import Fraction

__all__ = ["typed", "ratio", "positive_int", "nonnegative_int", "positive_float", "seed", "tcp_port", "widths",
           "HelpFormatter"]


def typed(parse, ok, want: str, kind: str):
    """An argparse type: ``parse`` the text, then check its range, both with errors argparse shows."""
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return convert


ratio = typed(lambda t: float(Fraction(t)), lambda v: 0 <= v <= 1, "between 0 and 1", "a number or fraction")
positive_int = typed(int, lambda v: v >= 1, ">= 1", "an integer")
nonnegative_int = typed(int, lambda v: v >= 0, ">= 0", "an integer")
positive_float = typed(float, lambda v: math.isfinite(v) and v > 0, "a number > 0", "a number")
seed = typed(int, lambda v: 0 <= v < 2**63, "an integer >= 0", "an integer")


def _parse_widths(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        bits, d = part.strip().lower().split("x")
        out.append((int(bits), int(d)))
    return tuple(out)


# "2x4,3x2": (bits, vector length) pairs; --bits-budget's candidates
widths = typed(_parse_widths, lambda v: len(v) >= 2 and len(set(v)) == len(v) and all(
    1 <= b <= 8 and d >= 1 and not d & (d - 1) and b * d <= 16 for b, d in v),
    "two or more different BITSxD with bits 1..8, D a power of 2 and bits*D <= 16", "a list of BITSxD")
tcp_port = typed(int, lambda v: 0 < v < 65536, "a TCP port (1..65535)", "a TCP port")


class HelpFormatter(argparse.HelpFormatter):
    """Shows a default only where there is one (not on required options or flags), fractions as fractions."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if action.required or d is None or d is False or d is argparse.SUPPRESS or "(default" in text:
            return text
        if isinstance(d, float) and d and Fraction(d).limit_denominator(4096) == Fraction(d) and d != int(d):
            d = str(Fraction(d).limit_denominator(4096))
        return f"{text} (default: {str(d).replace('%', '%%')})"
