"""What every job's command line shares: one way to build its parser, one exit-status convention,
and the failures of its surroundings named in one line instead of a traceback.

    0  done
    1  a run-time failure, named: the object store (no credentials, refused credentials, an
       endpoint that does not answer), a table that cannot be read, a refused promotion
    2  bad arguments or input, with the fix

Flags are spelled in full (an abbreviation could take a removed flag for a longer one that starts
like it: the labeling jobs' old --output for --output-table), and every job takes --verbose,
which brings back the libraries' chatter that the console leaves out by default.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from dataclasses import dataclass

from clf_core.errors import ClfError
from clf_core.settings import add_arguments, setting


@dataclass
class CommonSettings:
    verbose: bool = setting("Show the libraries' log lines too (Ray, botocore, ...), not only this job's.",
                            default=False)


def build_parser(prog: str, doc: str, *settings: type, subcommands: dict[str, tuple[str, tuple[type, ...]]] | None = None,
                 **kwargs) -> argparse.ArgumentParser:
    """A job's parser: its settings' flags (clf_core.settings), --verbose, no abbreviations. With
    `subcommands` ({name: (help, settings classes)}), one subparser each, built the same way (the
    flags, --verbose included, go after the subcommand's name)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], allow_abbrev=False, **kwargs)
    for cls in settings if subcommands else (*settings, CommonSettings):
        add_arguments(parser, cls)
    if subcommands:
        commands = parser.add_subparsers(dest="command", required=True)
        for name, (text, classes) in subcommands.items():
            sub = commands.add_parser(name, help=text, description=text, allow_abbrev=False)
            for cls in (*classes, CommonSettings):
                add_arguments(sub, cls)
    return parser


def verbose(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "verbose", False))


def main(parser: argparse.ArgumentParser, argv: list[str] | None, job: Callable[[argparse.Namespace], int]) -> int:
    """A job's `main`: parse, set up logging (quiet unless --verbose), run `job(args)` through `run`."""
    from clf_core.logs import setup_logging

    args = parser.parse_args(argv)
    setup_logging(verbose=verbose(args))
    return run(lambda: job(args))


def run(body: Callable[[], int]) -> int:
    """Run a job's body; return its exit status. A bad input (ClfError) is 2; a table that cannot
    be read, or an object store that cannot be used, is 1 and says which; a closed pipe (`| head`)
    ends the job quietly. Anything else is a bug and keeps its traceback."""
    from clf_core.storage import StorageAccessError, access_problem
    from clf_core.errors import TableError

    try:
        return body()
    except BrokenPipeError:
        # The reader of our output went away (`... | head -3`): stop, as `cat` does, without a
        # traceback, and without a second one when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        problem = access_problem(exc)
        if problem is not None:
            where = "" if isinstance(exc, StorageAccessError) else f"{str(exc).strip().splitlines()[0][:200]}: "
            print(f"error: {where}{problem}", file=sys.stderr)
            return 1
        if isinstance(exc, (TableError, StorageAccessError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, ClfError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
