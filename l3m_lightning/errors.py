"""What the command line prints for an error: one line for a mistake in the config or the data, a traceback for a bug.

The rule (docs/metrics.md, "Errors"):

* **one line** on stderr, ``error: <what, where, what was expected>``, and exit status 2, for
  - a ``ConfigError`` raised at any point: our checks of data files and rows, output folders,
    model folders (missing, or needing custom code) and reward models that will not load;
  - a ``ValueError``, ``TypeError``, ``OSError`` (``FileNotFoundError`` ...), ``ImportError`` or
    Lightning ``MisconfigurationException`` raised while the command line and config are parsed and
    the model, data module and trainer are built from them — the classes' own argument checks.
    jsonargparse wraps some of these in its own ``ValueError``; the innermost cause's message is
    printed. Parse errors themselves (unknown option, wrong type) go through ``OneLineErrorParser``.
* **a traceback**, as Python prints it, for anything else — in particular any other exception once
  training, validation or prediction has started (a ``RuntimeError`` in a forward pass is a bug or
  a resource problem, and its stack is what you need).
* ``L3M_DEBUG=1`` prints the traceback in every case.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, Callable, TypeVar

from lightning.pytorch.cli import LightningArgumentParser

from constraints.base import ConfigError

__all__ = ["ConfigError", "OneLineErrorParser", "debug_enabled", "one_line", "report_errors", "user_error_message"]

T = TypeVar("T")
DEBUG_ENV = "L3M_DEBUG"
#: Set on an exception that escaped the subcommand (fit, validate, ...) rather than the parsing and building before it.
RUN_PHASE_ATTR = "_l3m_raised_while_running"
_CONFIG_PHASE_TYPES: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)
_MAX_CHARS = 600


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(message: str, limit: int = _MAX_CHARS) -> str:
    """``message`` with every run of whitespace (newlines included) made one space, cut at ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _misconfiguration_types() -> tuple[type[BaseException], ...]:
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover
        return ()
    return (MisconfigurationException,)


def _raised_in(err: BaseException, package: str) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in ``package`` (a wrapper that re-raises someone else's error)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}{package}{os.sep}" in tb.tb_frame.f_code.co_filename


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and its explicit causes (``raise ... from``), outermost first."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return chain


def user_error_message(err: BaseException) -> str | None:
    """The one line to print for ``err``, or None when it should show its traceback (see the module docstring)."""
    chain = _causes(err)
    for e in chain:
        if isinstance(e, ConfigError):
            return one_line(str(e) or type(e).__name__)
    if getattr(err, RUN_PHASE_ATTR, False):
        return None
    # Building from the config: look through jsonargparse's wrappers to the error the class itself raised.
    inner = err
    while inner.__cause__ is not None and _raised_in(inner, "jsonargparse"):
        inner = inner.__cause__
    if isinstance(inner, _CONFIG_PHASE_TYPES + _misconfiguration_types()):
        message = str(inner) or type(inner).__name__
        if isinstance(inner, OSError) and inner.filename and str(inner.filename) not in message:
            message = f"{message}: {inner.filename}"
        return one_line(message)
    return None


def report_errors(build: Callable[[], T]) -> T:
    """Run ``build`` (a LightningCLI construction, which parses, builds and runs the subcommand); print user errors as one line, exit 2."""
    if debug_enabled():
        return build()
    try:
        return build()
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        sys.stderr.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def mark_run_phase(err: BaseException) -> None:
    """Tag ``err`` as raised by the subcommand itself, after the config was parsed and built."""
    try:
        setattr(err, RUN_PHASE_ATTR, True)
    except (AttributeError, TypeError):  # an exception type that refuses attributes: it shows its traceback anyway
        pass


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser with abbreviations off (``--model.num_sample`` is not ``--model.num_samples``) and one-line errors.

    The usage text and the tip still come first; the last line is the error, on one line, with a
    "did you mean" when an unknown option is close to a real one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> Any:
        parser = getattr(ex, "subcommand_parser", None) or self
        return super().error(tidy_parse_error(message, _option_names(parser)), ex)


def _option_names(parser: Any) -> list[str]:
    names = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in getattr(p, "_actions", []):
            names.update(o for o in action.option_strings if o.startswith("--"))
            for sub in (getattr(action, "choices", None) or {}).values() if isinstance(getattr(action, "choices", None), dict) else ():
                if hasattr(sub, "_actions"):
                    stack.append(sub)
    return sorted(names)


def tidy_parse_error(message: str, options: list[str]) -> str:
    """One line: whitespace collapsed, jsonargparse's ``<class 'int'>`` shown as ``int``, a close option name suggested."""
    text = one_line(message, limit=2000)
    text = re.sub(r'^Parser key "([^"]+)": ', r"\1: ", text)
    text = re.sub(r"Expected an? <class '(?:[\w.]+\.)?(\w+)'>\.?", r"expected \1;", text)
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    text = re.sub(r"; Got value: (.*)$", r", got \1", text)
    union = re.match(r"^(.*?): Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] Errors: (.*?) Given value type: (\S+) Given value: (.*)$", text)
    if union:  # jsonargparse lists why each allowed type failed: keep the specific reasons, else the allowed types
        key, subtypes, errors, given_type, given = union.groups()
        reasons = [r.strip(" ;") for r in re.split(r"(?:^|\s)- ", errors) if r.strip(" ;")]
        specific = [r for r in reasons if not r.startswith(("expected ", "Not a valid subclass"))]
        allowed = " or ".join(_split_top_level(subtypes.replace("typing.", "")))
        text = f"{key}: {'; '.join(specific) if specific else 'expected ' + allowed}, got {given} ({given_type})"
    unknown = re.findall(r"(?:unrecognized arguments: |does not accept option ')(--?[\w.\-]+|[\w.\-]+)", text)
    if unknown:
        name = unknown[0] if unknown[0].startswith("--") else f"--{unknown[0]}"
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
        if close and close[0] != name:
            text += f" (did you mean {close[0]}?)"
    return one_line(text)


def _split_top_level(text: str) -> list[str]:
    """``"list[dict[str, Any]], NoneType"`` -> ``["list[dict[str, Any]]", "NoneType"]``: commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]
