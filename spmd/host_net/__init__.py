"""Direct TCP connections between the processes of a job, for :mod:`spmd.host`'s messages.

:mod:`spmd.host` numbers every host-level call and moves its messages either through the
coordination service's key-value store or, by default, over the connections built here. Values
travel in :mod:`spmd.wire`'s format (JSON tree plus packed array bytes, no pickle). The pieces,
one concept each:

* :mod:`~spmd.host_net._peers`: setting up (addresses published in the key-value store, the
  transport decision, connecting and accepting) and :class:`PeerConnections`, this process's connections;
* :mod:`~spmd.host_net._frame`: this protocol's frames and handshake on :mod:`spmd.stream`'s wire
  (HMAC-SHA256 over a per-job secret, both ways), and one connection's non-blocking writer and
  incremental reader (sizes checked before anything is allocated);
* :mod:`~spmd.host_net._call` and :mod:`~spmd.host_net._exchange`: one call's identity, and its
  frames between every pair of processes within one deadline (mismatches, errors and aborts
  seen on both sides);
* :mod:`~spmd.host_net._ops`: which frames ``broadcast``, ``all_gather`` and ``barrier`` send.

The protocol, with its guarantees and its measurements: docs/host_messages.md.
"""

from spmd.envs import HOST_TRANSPORTS as TRANSPORTS
from spmd.host_net._call import Call, describe
from spmd.host_net._frame import ABORT, EAGER_MAX_BYTES, ERROR, INTENT, MAX_CONTROL_HEADER, MSG
from spmd.host_net._peers import NetConfig, PeerConnections

__all__ = [
    "ABORT",
    "EAGER_MAX_BYTES",
    "ERROR",
    "INTENT",
    "MAX_CONTROL_HEADER",
    "MSG",
    "TRANSPORTS",
    "Call",
    "PeerConnections",
    "NetConfig",
    "describe",
]
