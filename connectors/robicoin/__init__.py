"""Robicoin REST API v1: protocol, client, poller source and order sink."""
