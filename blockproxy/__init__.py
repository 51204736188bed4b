"""blockproxy: a predictive, gossip-coordinated reverse proxy for vLLM fleets."""

__version__ = "0.1.0"
