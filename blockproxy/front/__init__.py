"""The HTTP front (aiohttp): ``app`` wires the parts into routes and background loops;
``generate`` is the request path; ``relay`` reads what streams through; ``endpoints``
serves the rest; ``gate`` admits requests and drains them on shutdown."""
