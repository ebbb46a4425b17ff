"""Errors a user can act on. The CLI prints them as one line, without a traceback, and exits 2."""


class DsV4Error(Exception):
    """Bad input or a refused operation; the message names the file and key where there is one."""
