"""Fast, synchronous tests: no real server, no worker processes; the whole set runs in seconds."""
