"""What the command lines (``train.py``, ``eval.py``) share: flag parsing and one-sentence error messages.

A user's mistake ends a command with one line, ``error: <sentence>``, that says what is wrong and what to
do, instead of a traceback: a misspelled ``--config.FIELD`` override, a bad argument to the config file,
any of :data:`apjax.train_lib.USER_ERRORS`, and a full disk (however deep in Orbax or tensorstore it was
noticed).
"""

from __future__ import annotations

import difflib
import errno
import re
import sys
from typing import Any

from absl import flags

# tensorstore (under Orbax) reports a full disk as RESOURCE_EXHAUSTED with the OS error's text and code.
_DISK_FULL_MARKS = ("No space left on device", "os_error_code='28'")
_WRITTEN_FILE = re.compile(r'(?:Failed writing|Error writing local file|Failed to write to): "([^"]+)"')
_EXCEPTION_PREFIX = re.compile(r"^[\w.]*(Error|Exception): ")


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
    """True for the errors a command line reports in one sentence: the user's to fix, or a full disk."""
    from apjax.train_lib import USER_ERRORS

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


def _fields(config: Any, prefix: str = "") -> list[str]:
    """Every dotted field path of a ConfigDict (or dict): 'batch_size', 'data', 'data.image_size', ..."""
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _fields(v, f"{prefix}{k}.")
    return out


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
    if config is not None:  # absl's unknown flag, with the config loaded: compare with its fields
        fields = _fields(config)
        for path in overrides:
            if path not in fields:
                close = difflib.get_close_matches(path, fields, n=1)
                return path, close[0] if close else None
        return None, None
    if isinstance(e, AttributeError | KeyError):  # ml_collections, while it applied the override
        text = str(e)
        hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
        for path in overrides:
            parent, _, last = path.rpartition(".")
            if hint and hint.group(2) == last:
                return path, f"{parent}.{hint.group(1)}" if parent else hint.group(1)
            if re.search(rf"'{re.escape(last)}\\?'", text):
                return path, None
    return None, None


def _config_file_error(text: str) -> str:
    """``flag --config=F: Error whilst parsing config file: <traceback>`` as ``--config=F: <last line>``."""
    head = text.split(": Error whilst parsing config file", 1)[0].removeprefix("flag ")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{head}: {_EXCEPTION_PREFIX.sub('', lines[-1])}"


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
        text = str(e)
        if "Error whilst parsing config file" in text and "Traceback" in text:
            sys.exit(f"error: {_config_file_error(text)}")
        sys.exit(f"error: {text}\nPass --helpshort or --helpfull to see help on flags.")
