"""The Hugging Face hub, failing fast: one quick connection test, and offline mode when it fails, so a machine
without network gets one line naming the data set and how to use a local copy instead of minutes of retries
and a ConnectionError traceback. HF_HUB_OFFLINE=1 skips the test."""

import functools
import os
import socket
import sys
from urllib.parse import urlparse

from kit.errors import UserError

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class HubUnavailable(UserError, ValueError):
    """Something the run needs is on the hub, the hub cannot be reached, and there is no cached copy."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in ("1", "ON",
                                                                                                  "YES", "TRUE")


def host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname


@functools.cache
def reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection; if not, this process switches to offline mode (cached files only)."""
    if offline():
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True  # behind a proxy a direct connection proves nothing; the libraries go through the proxy
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        go_offline()
        return False


def go_offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    # the libraries read the variable when imported; tell the ones that already are
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        if module in sys.modules:
            for name in names:
                setattr(sys.modules[module], name, True)


def load_dataset(repo_id: str, *args, **kwargs):
    """datasets.load_dataset for a hub data set, turning "no network and no cached copy" into one line."""
    import datasets

    online = reachable()
    try:
        return datasets.load_dataset(repo_id, *args, **kwargs)
    except (ConnectionError, OSError) as error:
        why = f"{host()} cannot be reached" if not online else f"loading it failed ({str(error).splitlines()[0]})"
        raise HubUnavailable(
            f"data set {repo_id}: {why} and there is no cached copy; fetch it once where there is network "
            f"(python -c \"import datasets; datasets.load_dataset('{repo_id}')\") and copy ~/.cache/huggingface "
            "here (or set HF_HOME to the copy), or train on a local file with --set dataset=jsonl:PATH") from None
