"""``python -m measuring.worker PARENT_PID``: one worker process (``measuring.worker.main``)."""

import sys

from measuring.worker.main import main

main(sys.argv)
