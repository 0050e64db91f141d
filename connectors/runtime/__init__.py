"""Exchange-agnostic runtime shared by every connector.

Nothing in this package names an exchange: exchanges plug in through
:mod:`connectors.runtime.plugins`.
"""
