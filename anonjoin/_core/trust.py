"""The token rule's hosts (issue 11), sans I/O: where a request carrying a token may go.

A token (the AAD bearer or the psat) goes only over https and only to a host of the service: the discover
URL's host (:meth:`TrustedHosts.trust`); a host named by an absolute https ``href`` in a 2xx answer received
over https from a trusted host (:meth:`TrustedHosts.learn`); a host a trusted host redirected a token-less
request to over https (the driver calls :meth:`TrustedHosts.trust` for it). Names, any port.
"""

from __future__ import annotations

import re

from yarl import URL

__all__ = ["TrustedHosts"]

_HREF_HOST = re.compile(rb'"href"\s*:\s*"https://([^"/?#\\\\]+)')
"""The authority of an absolute https href in a JSON body (relative hrefs stay on the answering host)."""


class TrustedHosts:
    __slots__ = ("_hosts",)

    def __init__(self) -> None:
        self._hosts: set[str] = set()

    def trust(self, url: URL) -> None:
        if url.host:
            self._hosts.add(url.host.lower())

    def trusted(self, url: URL) -> bool:
        """Whether a request carrying a token may go to ``url`` (https, and a host of the service)."""
        return url.scheme == "https" and url.host is not None and url.host.lower() in self._hosts

    def learn(self, url: URL, body: bytes) -> None:
        """A 2xx answer from ``url``: if it came over https from a trusted host, the hosts its absolute https
        hrefs name are the service's too."""
        if b"https://" not in body or not self.trusted(url):
            return
        for m in _HREF_HOST.finditer(body):
            try:
                host = URL(f"https://{m.group(1).decode('ascii', 'replace')}").host
            except (ValueError, TypeError):
                continue  # unusable: whatever it names stays untrusted
            if host:
                self._hosts.add(host.lower())
