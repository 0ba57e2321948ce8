"""
The server runtime: the twistd process with the reactor.

It never runs formula code and never blocks the reactor: formulas run in worker processes
(``pool``), blocking calls in threads of its own (``threads``). ``tap`` wires the service from
the settings; nothing else touches the global reactor.
"""
