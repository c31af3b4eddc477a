"""Entry-point helpers shared by train.py, attack.py and the scripts: bad input ends in one clear line, not a
traceback (:func:`run_main`); configs compared key by key (:func:`flat_entries`)."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError)
_DURING_WORK = "_raised_during_work"


def mark_raised_during_work(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised after the long work had started (inside the attack loop, the training fit): then
    :func:`run_main` shows its traceback and exits with status 1 even when it is a ValueError, because such an
    error is a failure to debug, not a configuration to fix (the pre-run checks raise the bad-input errors).
    Returns ``exc`` (``raise mark_raised_during_work(exc)`` reads naturally)."""
    setattr(exc, _DURING_WORK, True)
    return exc


def run_main(main: Callable[[], Any], prog: str) -> None:
    """Call ``main()``; a ValueError, FileNotFoundError or FileExistsError (the project's bad-input errors, raised
    before long work starts) is printed as ``"<prog>: error: <message>"`` on stderr and exits with status 2, like
    argparse's own usage errors. Any other exception, and one of those marked with :func:`mark_raised_during_work`
    (raised after the long work started: a bug or a failure, not bad input), propagates with its traceback
    (Python's exit status 1)."""
    try:
        main()
    except BAD_INPUT as exc:
        if getattr(exc, _DURING_WORK, False):
            raise
        print(f"{prog}: error: {clarify_subclass_error(str(exc))}", file=sys.stderr)
        raise SystemExit(2)


def parse_device(text: str):
    """A script's ``--device`` value as a ``torch.device`` this machine has: ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: not a device string, another device type (``mps``, ``gpu``, ...), CUDA asked for on a machine
            without it, or ``cuda:N`` beyond the visible devices; the message starts with ``--device 'TEXT'`` and
            says what to pass instead (scripts pass it to ``ArgumentParser.error``).
    """
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"--device {text!r}: {exc} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r}: CUDA is not available on this machine (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def did_you_mean(owner: type, option: str, skip: tuple[str, ...] = ("self",)) -> str:
    """`` (did you mean 'x'?)`` naming up to three init arguments of class ``owner`` close to the unknown ``option``
    (``difflib.get_close_matches``), or "" when none is close."""
    import difflib
    import inspect

    try:
        names = [n for n in inspect.signature(owner.__init__).parameters if n not in skip]
    except (TypeError, ValueError):
        return ""
    close = difflib.get_close_matches(option, names, n=3)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def clarify_subclass_error(message: str) -> str:
    """jsonargparse's error for an option a subclass group's class does not take, as one line.

    ``Parser key "model": Does not validate against any of the Union subtypes ... - Problem with given class_path
    'lightning_modules.classifier.ImageClassifier': Option 'lrr' is not accepted - Expected a <class 'NoneType'> ...
    Given value: NestedArg(...)`` becomes ``model (ImageClassifier): Option 'lrr' is not accepted (did you mean
    'lr'?)``. Two more forms: the class's own error at instantiation (``Does not validate against any of the Union
    subtypes ... Errors: - classifier checkpoint X not found ... - Expected a <class 'NoneType'> ... Given value:
    Namespace(class_path='...ImageClassifier', ...)`` becomes ``ImageClassifier: classifier checkpoint X not found
    ...``), and a group given as a config file that is not there (``Parser key "model": - Expected a path but
    ../model/x.yaml either not accessible or invalid ...`` says that relative paths in a config file resolve from that
    file's folder). Any other message is returned unchanged."""
    import importlib
    import re

    missing = re.match(r'Parser key "([\w.]+)":\s*- Expected a path but (\S+) either not accessible or invalid', message)
    if missing and missing.group(2).lower().endswith((".yaml", ".yml", ".json")):  # else a class name (typo?)
        key, path = missing.groups()
        return (f"{key}: the config file {path} was not found. A relative path resolves from the current folder on the "
                "command line and from the naming file's own folder inside a config file: a config copied elsewhere "
                "needs the files it names copied along (keeping their relative places) or absolute paths")
    if message.startswith("Does not validate against any of the Union subtypes"):
        block = message.split("Errors:", 1)[1].split("\nGiven value", 1)[0] if "Errors:" in message else ""
        errors = [e.strip() for e in re.split(r"\n\s*- ", "\n" + block.strip()) if e.strip()]
        errors = [" ".join(e.split()) for e in errors if not e.startswith("Expected a <class 'NoneType'>")]
        cls = re.search(r"class_path='([\w.]+)'", message)
        if errors:
            name = f"{cls.group(1).rpartition('.')[2]}: " if cls else ""
            return "; ".join(name + e for e in dict.fromkeys(errors))
        return message

    m = re.match(r'Parser key "([\w.]+)":', message)
    problems = re.findall(r"Problem with given class_path '([\w.]+)':\s*(.+?)\s*(?=\n\s*- |\n\s*Given value|$)",
                          message, re.S)
    if not m or not problems:
        return message
    out = []
    for path, problem in problems:
        problem = " ".join(problem.split())
        module, _, name = path.rpartition(".")
        unknown = re.match(r"Option '(\w+)' is not accepted", problem)
        if unknown and module:
            try:
                problem += did_you_mean(getattr(importlib.import_module(module), name), unknown.group(1))
            except Exception:  # noqa: BLE001  (a suggestion is optional; the message stands without it)
                pass
        out.append(f"{m.group(1)} ({name}): {problem}")
    return "; ".join(dict.fromkeys(out))  # one line per problem (a Union of X and list[X] reports it twice)


def flat_entries(node: Any, prefix: str = "") -> dict:
    """A nested config dict as ``{dotted key: leaf value}`` (lists, None and empty dicts are leaves), e.g.
    ``{"trainer": {"precision": "32-true"}}`` -> ``{"trainer.precision": "32-true"}``."""
    if isinstance(node, dict) and node:
        out: dict = {}
        for key, value in node.items():
            out.update(flat_entries(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_groups(path) -> set:
    """The top-level keys of the YAML config file ``path`` (e.g. {'users', 'attack', ...} for attack.py's,
    {'audit', ...} for scripts/objective_audit.py's, {'model', 'data', 'trainer', ...} for train.py's); empty when it
    cannot be read or parsed, or is not a mapping."""
    import yaml
    from pathlib import Path

    try:
        data = yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 - unreadable or not YAML: no groups known
        return set()
    return set(data) if isinstance(data, dict) else set()


class DuplicateKeyError(ValueError):
    """A key given twice in one YAML mapping (raised by :func:`unique_key_loader`'s loader)."""


@functools.lru_cache(maxsize=None)
def unique_key_loader():
    """A ``yaml.SafeLoader`` subclass that refuses a key given twice in one mapping (``yaml.safe_load`` keeps the
    last one silently: ``grid: {seed: [0, 1], seed: [5]}`` would sweep seed 5 alone; ``steps: 3`` then ``steps: 5`` in an attack config ran 5
    steps). Used by sweep.py for sweep files and by attack.py for its ``--config`` files. Merge keys (``<<:``) and the
    keys they bring in may still be overridden, as YAML intends.

    Raises (when loading):
        DuplicateKeyError: naming the key and the lines of both occurrences.
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def compose_mapping_node(self, anchor):
            # checked on the composed node, before PyYAML flattens merge keys into it (an anchored mapping that
            # holds a '<<:' is flattened in place, so checking at construction saw its merged keys as repeats)
            node = super().compose_mapping_node(anchor)
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(
                        f"key {key_node.value!r} is given twice in one mapping (lines {first[key]} and {line}); YAML "
                        f"would keep only the last one. Fix: delete one, or merge their values into one entry "
                        f"(e.g. one list of all the values for a grid key)")
                first[key] = line
            return node

    return UniqueKeyLoader


def suggest_for_unrecognized(message: str, known_options) -> str:
    """argparse's ``unrecognized arguments: --trainer.max_stepz 3`` with `` (did you mean --trainer.max_steps?)``
    appended for each unknown ``--option`` close to one of ``known_options`` (a parser's option strings, e.g.
    ``parser._option_string_actions``; difflib, cutoff 0.8); any other message is returned unchanged."""
    import difflib
    import re

    m = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if not m:
        return message
    known = [k for k in known_options if k.startswith("--")]
    hints = []
    for arg in m.group(1).split():
        option = arg.split("=", 1)[0]
        if option.startswith("--"):
            close = difflib.get_close_matches(option, known, n=1, cutoff=0.8)
            if close:
                hints.append(f"{option}: did you mean {close[0]}?")
    return message + (f" ({'; '.join(hints)})" if hints else "")
