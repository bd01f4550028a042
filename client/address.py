"""Server addresses: "host:port" (an IPv6 host in brackets) checked and split, and comma-separated lists of them."""

from __future__ import annotations

MAX_PORT = 65535


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "host:port"; ValueError naming the text when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
        raise ValueError(f"a server address is host:port with a port in 1..{MAX_PORT}, got {address!r}")
    return host.strip("[]"), int(port)


def parse_server_list(text: str) -> list[str]:
    """The addresses of "host:port,host:port,...", each checked; ValueError if it lists none."""
    addresses = [item.strip() for item in text.split(",") if item.strip()]
    if not addresses:
        raise ValueError(f"the server list is empty: {text!r}")
    for address in addresses:
        split_address(address)
    return addresses
