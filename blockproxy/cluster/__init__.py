"""What the proxy knows about the fleet: instances, their active requests, calibration.

``view`` (all instances by name) → ``instance`` (one backend: limits, health, simulator
model) → ``requests`` (its active requests: the columnar table the simulator reads);
``calibration`` learns each instance's speed; ``scraper`` adds the load that bypasses the
proxies.  Everything but the scraper is synchronous and does no I/O.
"""

from blockproxy.cluster.instance import Instance
from blockproxy.cluster.requests import LOCAL, PHANTOM, Entry, RequestTable
from blockproxy.cluster.view import ClusterView

__all__ = ["LOCAL", "PHANTOM", "ClusterView", "Entry", "Instance", "RequestTable"]
