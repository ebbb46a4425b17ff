"""HTTP to the local server: its URL, and requests that never go through a proxy from the environment."""

from __future__ import annotations

import urllib.error
import urllib.request

from pipeline.serve.settings import LOCAL_HOST, ServeSettings

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send localhost to a proxy


def client_host(host: str) -> str:
    return LOCAL_HOST if host in ("", "0.0.0.0", "::") else host


def base_url(settings: ServeSettings) -> str:
    return f"http://{client_host(settings.host)}:{settings.port}"


def get_status(url: str, timeout: float) -> int:
    """The HTTP status of GET ``url``; 0 when nothing answers."""
    try:
        with OPENER.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0
