"""Cryptomus exchange: WebSocket market and account streams."""
