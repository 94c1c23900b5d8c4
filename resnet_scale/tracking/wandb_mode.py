"""Whether W&B can go online: an API key (or ``netrc`` entry) and a reachable server, else offline
with the reason. Imports no wandb."""

from __future__ import annotations

import netrc
import os
import socket
from urllib.parse import urlparse

_DEFAULT_BASE_URL = "https://api.wandb.ai"


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL


def has_wandb_credentials() -> bool:
    """An API key in ``WANDB_API_KEY``, a ``netrc`` entry for the W&B host (what ``wandb login``
    writes), or an identity-token file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(_base_url()).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return bool(netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_server_reachable(timeout: float = 3.0) -> str | None:
    """``None`` when a TCP connection to the W&B server opens, else why not."""
    url = urlparse(_base_url())
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {_base_url()} ({err.strerror or err})"


def wandb_mode() -> tuple[str, str | None]:
    """(mode, why offline): ``online`` only with credentials and a reachable server."""
    env = (os.environ.get("WANDB_MODE") or "").lower()
    if env == "disabled":
        return "disabled", None
    if env in ("offline", "dryrun"):
        return "offline", "WANDB_MODE=offline"
    if not has_wandb_credentials():
        host = urlparse(_base_url()).hostname
        return "offline", f"no W&B API key (WANDB_API_KEY is unset and ~/.netrc has no entry for {host})"
    unreachable = wandb_server_reachable()
    if unreachable:
        return "offline", unreachable
    return "online", None
