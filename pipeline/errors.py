"""Errors a user can act on. The CLI prints them as one line, without a traceback, and exits 2."""


class DsV4Error(Exception):
    """Bad input or a refused operation; the message names the file and key where there is one."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a step's writing: the message says what is on disk and how to continue.

    A KeyboardInterrupt still, so a caller that does not know this class stops as it would on Ctrl-C;
    the CLI prints the message as one line and exits 130 (128 + SIGINT, as a shell reports it)."""


def one_line(problems: list[str], *, show: int = 1, listing: str = "") -> str:
    """Several problems as one error line: the first ``show`` of them, then how many more and, where a
    command lists them all (``listing``, e.g. "`dsv4 validate PATH` lists them"), how to see them.

    One line because every refusal is one line (a user greps it, a runner's log keeps it whole); the
    first problem is the one a fix starts with: later ones are often its consequences."""
    shown = (
        problems[0]
        if min(show, len(problems)) == 1
        else "; ".join(f"[{i}/{len(problems)}] {p}" for i, p in enumerate(problems[:show], 1))
    )  # numbered: a problem's own text may hold "; "
    more = len(problems) - show
    if more <= 0:
        return shown
    return f"{shown} (and {more} more problem(s){'; ' + listing if listing else ''})"
