"""End-to-end tests: the real ``twistd -n measuring``, real worker processes, real files."""
