"""UDP gossip between proxies: several stateless proxies share one cluster view.

``codec`` (datagram format and HMAC), ``transport`` (the only gossip network I/O),
``membership`` (seeds, DNS, peers heard from), ``state`` (remote entries per origin:
deltas, snapshots, gaps, incarnations) and ``node`` (the :class:`Gossiper` that ties them
to the cluster view).  See DESIGN.md section 3 and the README section on gossip.
"""
