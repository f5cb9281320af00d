"""The configs that ship with fewstep, one per recipe (``fewstep/configs/*.yaml``; the repository's ``configs/``
links there): listed by ``fewstep configs``, found by name by ``fewstep train NAME`` from any folder
(:func:`resolve`, which :func:`fewstep.config.load` calls)."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "configs"  # the recipes installed with the package (``configs/`` links here)


def shipped() -> dict[str, Path]:
    """The configs that ship with fewstep, by name (the file name without ``.yaml``): ``fewstep configs`` lists them."""
    return {f.stem: f for f in sorted(SHIPPED.glob("*.yaml"))}


def describe(path) -> str:
    """A config file's one-line description: its leading comment up to the first ``.``, ``:`` or ``;`` outside
    parentheses (``""`` without a comment)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text, depth = " ".join(lines), 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and ch in ".:;" and text[i + 1:i + 2] in (" ", ""):
            return text[:i]
    return text


def resolve(path_or_name) -> Path:
    """The config file ``path_or_name`` names: a file if one is there, else a shipped config of that name
    (``nmnist_small``, ``nmnist_small.yaml`` or, as the docs write it, ``configs/nmnist_small.yaml``), so an
    installed fewstep runs its recipes from any folder. A file that exists always wins."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    ship = shipped()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent in (Path("."), Path("configs")) and name in ship:
        return ship[name]
    if p.exists():
        raise FileNotFoundError(f"config {p} is not a file")
    if name in ship:
        raise FileNotFoundError(f"config file not found: {p}. fewstep ships a config named {name}: give the name "
                                f"alone to use it")
    import difflib

    close = difflib.get_close_matches(name, list(ship), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise FileNotFoundError(f"config file not found: {p} (no such file, and fewstep ships no config of that name)."
                            f"{hint} `fewstep configs` lists the {len(ship)} configs it ships.")
