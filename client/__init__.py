"""ringlm.client: the consistent-hash client of a ringlm cluster (ring, pools, failover, discovery)."""

from ringlm.client.client import Client, ClientConfig, Stream
from ringlm.client.discovery import StaticDiscovery, ZooKeeperDiscovery
from ringlm.client.errors import (CancelledError, DeadlineExceededError, InvalidRequestError, ModelError,
                                  NoServerAvailableError, OverloadedError, RinglmError, ServerUnavailableError,
                                  UnauthorizedError)
from ringlm.client.result import Result, Timings, Usage
from ringlm.client.ring import Ring

__all__ = ["Client", "ClientConfig", "Stream", "Result", "Usage", "Timings", "Ring", "StaticDiscovery",
           "ZooKeeperDiscovery", "RinglmError", "InvalidRequestError", "OverloadedError", "DeadlineExceededError", "CancelledError",
           "UnauthorizedError", "ModelError", "ServerUnavailableError", "NoServerAvailableError"]
