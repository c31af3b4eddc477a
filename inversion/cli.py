"""Entry-point helper shared by train.py and attack.py: bad input ends in one clear line, not a traceback."""

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
