"""
The server's HTTP side (``--http``): a dashboard of the machine, the jobs and their results,
a JSON API with the TCP protocol's answers, and Prometheus metrics. Runs in the reactor process.

``site`` builds it: ``access`` (who may ask, from where), ``api`` (HTTP requests as protocol
requests to the dispatcher), ``metrics`` (counters the server keeps in memory) and ``static/``
(the page, its script and the vendored chart library, with its licence). Nothing here blocks
the reactor: no file is read after start, and what reads job files goes through the dispatcher
and its thread runner. May import twisted.web, prometheus_client and ``measuring.server``; the
rest of ``measuring.server`` never imports this package, except ``app``, which wires it.
"""
