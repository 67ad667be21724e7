"""A guard that outlives the addon: while no AwsMasker is loaded, requests to masked hosts are refused.

mitmproxy reloads a script when its file changes (a ``git pull`` that touches ``addon/masker.py``) and
unloads it when the file disappears; if the new script then fails to load, mitmproxy keeps running without
the addon, and requests to the LLM hosts would leave unmasked. The guard is registered with mitmproxy
itself (not with the script), so it stays; the addon arms it when it starts running and disarms it when it is
unloaded. A disarmed guard answers every request to a host of the last ``masker_hosts`` with a 503 until an
addon is loaded again (the next successful reload, or a restart).

One guard per process: the module is imported once and survives script reloads (mitmproxy re-executes the
script, not the package it imports).
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, http

from .errors import error_response

log = logging.getLogger(__name__)


class ReloadGuard:
    def __init__(self) -> None:
        self.masker: Any = None  # the AwsMasker in charge; None: none is loaded
        self.hosts: Any = None  # its HostSet: ``(host, port) in hosts``
        self.registered_with: Any = None  # the mitmproxy master the guard is an addon of

    def arm(self, masker: Any) -> None:
        """``masker`` is running: it masks, the guard stands by (registered with the master once)."""
        self.masker = masker
        self.hosts = masker.hosts
        master = ctx.master
        if self.registered_with is not master:
            master.addons.add(self)
            self.registered_with = master

    def disarm(self, masker: Any) -> None:
        """``masker`` is unloaded: until another one arms the guard, masked hosts are refused."""
        if self.masker is masker:
            self.masker = None
            exiting = getattr(getattr(ctx.master, "should_exit", None), "is_set", lambda: False)()
            if self.hosts is not None and not exiting:
                log.warning("aws-masker: the addon was unloaded; requests to masked hosts are refused until "
                            "it loads again (restart the proxy)")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.masker is not None or self.hosts is None or flow.response is not None:
            return
        host = (flow.request.host or "").lower().rstrip(".")
        if (host, flow.request.port) in self.hosts:
            flow.response = error_response(503, "the masking addon is not loaded (its script failed to "
                                                "reload?); nothing is forwarded: restart the proxy")
            flow.marked = ":no_entry:"
            flow.comment = "aws-masker: blocked (503): addon not loaded"


GUARD = ReloadGuard()
