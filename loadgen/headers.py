"""Request headers the load generator sends, defined once for the client and the emulator.

``x-loadgen-output-tokens`` carries a request's true output length; only the emulator reads
it (a router that forwards it unchanged changes nothing; one that drops it leaves the
emulator to its own draw).  ``x-blockproxy-output-tokens`` is blockproxy's client hint (the
"Block*" oracle setting); blockproxy defines the same name in
``blockproxy.routing.lengths.HINT_HEADER`` (a test checks they agree: neither package
imports the other).
"""

OUTPUT_TOKENS_HEADER = "x-loadgen-output-tokens"
HINT_HEADER = "x-blockproxy-output-tokens"
