"""What the command lines (``train.py``, ``eval.py``) share: flag parsing and one-sentence error messages.

A user's mistake ends a command with one line, ``error: <sentence>``, that says what is wrong and what to
do, instead of a traceback: a misspelled ``--config.FIELD`` override, a bad argument to the config file,
an :class:`apjax.errors.ConfigError` (bad config value, missing dataset or run, wrong workdir, mismatched
checkpoint), a run that became non-finite (``FloatingPointError``, naming the last good checkpoint), and a
full disk (however deep in Orbax or tensorstore it was noticed). Every other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from absl import flags

from apjax.errors import ConfigError

# The exceptions a command line prints as their one sentence: the user's mistakes, and a run that became
# non-finite (its message names the last good checkpoint and what to change).
USER_ERRORS = (ConfigError, FloatingPointError)

# tensorstore (under Orbax) reports a full disk as RESOURCE_EXHAUSTED with the OS error's text and code.
_DISK_FULL_MARKS = ("No space left on device", "os_error_code='28'")
_WRITTEN_FILE = re.compile(r'(?:Failed writing|Error writing local file|Failed to write to): "([^"]+)"')


def disk_full_path(e: BaseException) -> str | None:
    """The file being written if ``e``, or an error it was raised from, says the disk is full.

    Returns None when the disk is not the problem, '' when it is but the file is not known.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return str(cur.filename or "")
        text = str(cur)
        if any(mark in text for mark in _DISK_FULL_MARKS):
            found = _WRITTEN_FILE.search(text)
            return found.group(1) if found else ""
        cur = cur.__cause__ or cur.__context__
    return None


def is_user_error(e: BaseException) -> bool:
    """True for the errors a command line reports in one sentence (:data:`USER_ERRORS`, or a full disk)."""
    return isinstance(e, USER_ERRORS) or disk_full_path(e) is not None


def error_message(e: BaseException, output: str | None = None) -> str:
    """The sentence printed for a user error; a full disk is said in plain words, naming where.

    ``output`` (the command's output folder) names the place when the error does not name the file.
    """
    path = disk_full_path(e)
    if path is None:
        return str(e)
    where = path or output or "the output folder"
    return (
        f"the disk is full: there was no space left to write {where}; free some space or write to another "
        "disk, then run the same command again (a training run resumes from its last complete checkpoint)."
    )


@contextlib.contextmanager
def one_sentence_errors(output: str | None = None) -> Iterator[None]:
    """Ends the command with ``error: <sentence>`` (exit status 1) for a user's error raised inside
    (:func:`is_user_error`; ``output``, the command's output folder, names where a full disk struck) unless
    ``APJAX_DEBUG`` is set; every other exception keeps its traceback."""
    try:
        yield
    except Exception as e:
        if os.environ.get("APJAX_DEBUG") or not is_user_error(e):
            raise
        sys.exit(f"error: {error_message(e, output)}\n(set APJAX_DEBUG=1 to see the traceback)")


def _fields(config: Any, prefix: str = "") -> list[str]:
    """Every dotted field path of a ConfigDict (or dict): 'batch_size', 'data', 'data.image_size', ..."""
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _fields(v, f"{prefix}{k}.")
    return out


def _load_config(argv: list[str], flag_values: flags.FlagValues) -> Any:
    """The config that ``--config=F`` names, read again by the flag's own parser (None if it fails)."""
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    if not given or "config" not in flag_values:
        return None
    try:
        return flag_values["config"].parser.parse(given[-1])
    except Exception:  # the config file itself fails: absl reports that
        return None


def _misspelled_override(
    e: BaseException, argv: list[str], flag_values: flags.FlagValues
) -> tuple[str | None, str | None]:
    """(PATH of the ``--config.PATH`` override that names no config field, a close field or None).

    (None, None) when ``e`` is about something else.
    """
    if isinstance(e, flags.IllegalFlagValueError):  # a bad value, or the config file itself failed
        return None, None
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    config = flag_values["config"].value if "config" in flag_values else None
    if config is None and isinstance(e, AttributeError | KeyError):  # ml_collections, applying an override
        config = _load_config(argv, flag_values)
    if config is not None:  # compare the overrides with the config's own fields
        fields = _fields(config)
        for path in overrides:
            if path not in fields:
                parent, _, last = path.rpartition(".")  # a close name among the fields beside it
                siblings = [f.rpartition(".")[2] for f in fields if f.rpartition(".")[0] == parent]
                close = difflib.get_close_matches(last, siblings, n=1)
                return path, (f"{parent}.{close[0]}" if parent else close[0]) if close else None
        return None, None
    return None, None


# absl's message for a value a flag's parser refused: "flag --NAME=VALUE: <the parser's error>".
_BAD_VALUE = re.compile(r"flag --([\w.-]+)=(.*?): ", re.S)


def _innermost(e: BaseException) -> BaseException:
    """The exception at the bottom of ``e``'s chain of causes (``e`` itself when it has none)."""
    cause, seen = e, {id(e)}
    while (inner := cause.__cause__ or cause.__context__) is not None and id(inner) not in seen:
        cause = inner
        seen.add(id(cause))
    return cause


def _bad_flag_value(e: BaseException) -> str | None:
    """One line for absl's refusal of a flag's value, naming that flag; None for any other error.

    ``--config=F: <sentence>`` when the config file ``F`` raised (e.g. an unknown argument after the
    colon): that exception's own sentence, without the traceback absl folds into its message. Any other
    flag: ``--NAME=VALUE is not a valid value for --NAME (<the parser's reason>); ...``.
    """
    found = _BAD_VALUE.match(str(e)) if isinstance(e, flags.IllegalFlagValueError) else None
    if found is None:
        return None
    name, value = found.groups()
    cause = _innermost(e)
    if name == "config":
        return f"--config={value}: {cause}" if cause is not e else None
    reason = cause.args[0] if cause is not e and cause.args and isinstance(cause.args[0], str) else None
    reason = reason or str(e)[found.end() :].strip()
    if "must have a value other than None" in reason:  # a required flag left out
        return f"--{name} is required; give it a value (pass --helpshort to see what it takes)."
    return (
        f"--{name}={value} is not a valid value for --{name} ({reason.rstrip('.')}); pass --helpshort to see "
        "what it takes."
    )


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``), with mistakes said in one line.

    A ``--config.FIELD`` that names no field of the config (ml_collections raises an AttributeError or
    absl an unknown-flag error) gets a 'did you mean' from the config's own fields; an error raised by the
    config file's ``get_config`` (e.g. an unknown argument after the colon) is given without its traceback.
    Exits with status 1 and ``error: <sentence>`` on stderr.
    """
    try:
        return flag_values(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        unknown, close = _misspelled_override(e, argv, flag_values)
        if unknown is not None:
            hint = f"did you mean --config.{close}?" if close else "check its spelling in the config file."
            sys.exit(f"error: --config.{unknown} names no field of the config; {hint}")
        if not isinstance(e, flags.Error):
            raise
        failure = _bad_flag_value(e)
        if failure is not None:
            sys.exit(f"error: {failure}")
        sys.exit(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.")
