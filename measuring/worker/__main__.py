"""``python -m measuring.worker SERVER_PID``: the template process (``worker.template``)."""

import sys

from measuring.worker.template import main

main(sys.argv)
