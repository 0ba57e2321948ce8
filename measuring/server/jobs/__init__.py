"""Jobs, seen from the server: the scheduler, the job model (``records``) and the SQLite store."""
