"""What a client presents to servers: the shared auth token (from its file) and a TLS context."""

from __future__ import annotations

import os
import ssl
from pathlib import Path


def read_token_file(path: str | os.PathLike | None) -> str | None:
    """The shared auth token kept in `path` (surrounding whitespace dropped); None without a path.

    FileNotFoundError when the file is missing; ValueError when it holds nothing: an empty file is a
    secret that was never written (or was truncated), not a token to serve or present.
    """
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path}: the auth token file is empty")
    return token


def client_tls_context(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """TLS that trusts servers signed by `ca_file`, presenting `cert_file` to servers that ask for one."""
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False   # servers are addressed by IP as often as by name; the CA still vouches
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context
