"""One-off calls to one server outside any pool: is it up (`health`), what is it running (`status`).

The command line, `ringlm cluster` and the tests ask servers this way; a
Client's pool checks its own nodes over its pooled connections instead.
"""

from __future__ import annotations

import ssl

from ringlm.client.errors import RinglmError
from ringlm.client.pool import Connection, PoolConfig

HEALTH_TIMEOUT_S = 2.0


def probe(address: str, method: str = "health", *, timeout_s: float = HEALTH_TIMEOUT_S,
          auth_token: str | None = None, ssl_context: ssl.SSLContext | None = None):
    """`method`'s answer (a call without arguments: health, status) from a fresh connection to `address`,
    authenticated first when given a token, closed afterwards.

    Raises the client's typed errors: ServerUnavailableError when the server cannot be reached (refused,
    timed out, TLS refused) or hangs up, UnauthorizedError when it wants a token.
    """
    config = PoolConfig(connect_timeout_s=timeout_s, read_timeout_s=timeout_s, auth_token=auth_token,
                        ssl_context=ssl_context)
    connection = Connection(address, config)
    try:
        return connection.call(method, timeout_s=timeout_s)
    finally:
        connection.close()


def answers_health(address: str, *, timeout_s: float = HEALTH_TIMEOUT_S,
                   ssl_context: ssl.SSLContext | None = None) -> bool:
    """True when the server at `address` answers `health` now (it needs no token); False when it cannot."""
    try:
        return bool(probe(address, "health", timeout_s=timeout_s, ssl_context=ssl_context))
    except RinglmError:   # not listening yet, gone, or speaking another TLS
        return False
