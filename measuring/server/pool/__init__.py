"""
Worker processes, seen from the server: the pool, one worker process, process-tree helpers and
the sandbox's command line.
"""
