"""URLs as they may be printed: scheme, host and port only.

A Pushgateway or webhook URL can carry a secret in its userinfo, path (Slack's
``/services/T…/B…/token``) or query (``?token=``); none of them is ever logged.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def safe_url(url: str) -> str:
    """``scheme://host[:port]``, with ``/…`` when a path or query was dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<url>"
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def scrub(text: str, *urls: str | None) -> str:
    """``text`` with every given URL (and its host-stripped forms) replaced by its safe form."""
    for url in urls:
        if url:
            text = text.replace(url, safe_url(url))
            parts = urlsplit(url)
            for secret in (url.split("://", 1)[-1], parts.path, parts.query, parts.netloc):
                if len(secret.strip("/")) > 1:
                    text = text.replace(secret, "…")
    return text
