"""Loopback simulators of the exchanges, apart from the connectors that talk to them.

They enforce what the real exchanges enforce, so the tests, the demo, ``simulate`` and
the benchmarks meet the exchanges' rules without a real exchange. They ship in the wheel
(``exchange-connectors demo`` and ``simulate`` run them); the connectors never import them.

* :mod:`~connectors.simulators.harness`: what every simulator shares: starting one in the
  background for synchronous callers, reaching its test-control API, and running it in
  the foreground for ``exchange-connectors simulate``.
* :mod:`~connectors.simulators.cryptomus` and :mod:`~connectors.simulators.robicoin`: one
  package per exchange, split by concern: ``market`` (the market model and the data it
  publishes), ``rules`` (the exchange's documented rules), ``server`` (the sockets that
  apply them) and ``control`` (what tests and benchmarks use to look and to break things).
"""
