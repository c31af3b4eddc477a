"""Entry-point helpers shared by train.py, attack.py and the scripts: bad input ends in one clear line, not a
traceback (:func:`run_main`); configs compared key by key (:func:`flat_entries`)."""

from __future__ import annotations

import sys
from typing import Any, Callable

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError)


def run_main(main: Callable[[], Any], prog: str) -> None:
    """Call ``main()``; a ValueError, FileNotFoundError or FileExistsError (the project's bad-input errors, raised
    before long work starts) is printed as ``"<prog>: error: <message>"`` on stderr and exits with status 2, like
    argparse's own usage errors. Any other exception propagates with its traceback (a bug, not bad input)."""
    try:
        main()
    except BAD_INPUT as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2)


def flat_entries(node: Any, prefix: str = "") -> dict:
    """A nested config dict as ``{dotted key: leaf value}`` (lists, None and empty dicts are leaves), e.g.
    ``{"trainer": {"precision": "32-true"}}`` -> ``{"trainer.precision": "32-true"}``."""
    if isinstance(node, dict) and node:
        out: dict = {}
        for key, value in node.items():
            out.update(flat_entries(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}

