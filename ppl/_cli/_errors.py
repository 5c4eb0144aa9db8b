"""The one exception the command line turns into a one-line message and exit status 2."""

from __future__ import annotations


class CliError(Exception):
    """A problem with the user's input (a file, an argument, a missing package).

    The message is shown as `ppl: error: <message>` on one line, so it must say what is wrong and
    where (the file), without a traceback.
    """

    def __init__(self, message: str) -> None:
        # Library and loader messages can span lines; the command line promises one.
        super().__init__(" ".join(str(message).split()))
