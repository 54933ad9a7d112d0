"""``python -m xrpc.service NAME``: run the ``module`` service NAME (see ``docs/services.md``).

Clients launch it on demand; it can also be started by hand or by a supervisor.  It serves the
``xrpc.Server`` made by the description's ``module = "package.module:factory"`` on the service's
socket, and exits after ``idle_exit`` seconds without connections, or on SIGTERM once the calls in
flight are done.
"""

import sys

from ._services import main

if __name__ == "__main__":
    sys.exit(main())
