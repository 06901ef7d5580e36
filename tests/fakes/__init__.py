"""Fake platform servers (loopback aiohttp apps) and payload builders for the channel tests."""
