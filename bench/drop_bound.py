"""Does the drop bound hold its level, and what does it certify? A simulation against the bounds it replaced.

`fewstep cutoff --max-drop d` accepts a setting when a 95 % test rejects "the accuracy drop is at least d"
(:func:`fewstep.bounds.within`). Here validation sets of ``--n`` samples are drawn where an exit harms each sample
(right at T, wrong at the exit) with probability p_harm and helps it (wrong at T, right at the exit) with p_help,
and the share of draws in which each bound accepts d is counted:

- where the true drop p_harm − p_help is d or more, accepting is an error: a 95 % bound does so in at most 5 %;
- where it is below d, accepting is what the bound is for: the more often, the sooner the exits.

Bounds: ``exact`` (fewstep's drop bound since the sixteenth session, :func:`fewstep.bounds.drop_upper_bound`),
``bonferroni`` (the one before it: the harmed share's Clopper-Pearson upper bound minus the helped share's lower
bound, each at 97.5 %) and ``harm`` (the harmed share's bound alone, ``--bound harm``).

    .venv/bin/python bench/drop_bound.py                 # n = 1000, d = 1 pt, 1000 draws per row (~3 min)
    .venv/bin/python bench/drop_bound.py --n 5000 --d 0.006 --draws 400
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from fewstep import bounds


def accepts(name: str, h: int, g: int, n: int, d: float, confidence: float) -> bool:
    if name == "exact":
        return bounds.within("drop", h, g, n, d, confidence)
    if name == "harm":
        return bounds.harm_upper_bound(h, n, confidence) <= d
    return bounds.bonferroni_drop_bound(h, g, n, confidence) <= d


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="validation samples per draw")
    ap.add_argument("--d", type=float, default=0.01, help="the target drop (a fraction: 0.01 = 1 pt)")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    names = ("exact", "bonferroni", "harm")
    d = a.d
    # (p_help, true drop): at the edge d (errors), beyond it, and below it with answers changing both ways
    rows = [(ph, d) for ph in (0.0, 0.002, 0.01, 0.05, 0.2)] + [(0.01, d + 0.005)] + \
           [(ph, drop) for ph in (0.0, 0.01, 0.05) for drop in (0.0, d / 2)]
    print(f"n = {a.n}, d = {100 * d:g} pt, {a.draws} draws per row, {100 * a.confidence:g} % bounds: the share of "
          "draws in which each accepts d")
    print(f"| p_help | true drop (pt) | {' | '.join(names)} | |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for p_help, drop in rows:
        p_harm = p_help + drop
        t0 = time.perf_counter()
        counts = rng.multinomial(a.n, [p_harm, p_help, 1 - p_harm - p_help], size=a.draws)
        rate = {nm: np.mean([accepts(nm, int(h), int(g), a.n, d, a.confidence) for h, g, _ in counts]) for nm in names}
        kind = "error (≤ 5 %)" if drop >= d - 1e-12 else "certified"
        print(f"| {p_help:g} | {100 * drop:g} | " + " | ".join(f"{100 * rate[nm]:.1f} %" for nm in names)
              + f" | {kind}, {time.perf_counter() - t0:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
