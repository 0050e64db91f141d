"""Toyex: a small fake WebSocket exchange built only for the tests.

It proves the streaming runtime is generic: the plugin (``plugin.py``) is a dialect,
a plan and a URL; reconnects, markers, dead letters, back-pressure, metrics and health
all come from :mod:`connectors.runtime.streaming`. ``simulator.py`` is its own tiny
server.
"""
