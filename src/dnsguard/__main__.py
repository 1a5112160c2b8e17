"""``python -m dnsguard``: the same as the ``dnsguard`` command."""

import sys

from dnsguard.cli import main

sys.exit(main())
