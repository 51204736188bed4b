import sys

from blockproxy.cli import main

sys.exit(main())
