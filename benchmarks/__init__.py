"""Benchmarks comparing xrpc with raw asyncio floors and other Python RPC systems.

Run ``python -m benchmarks --help``; see ``benchmarks/README.md``.
"""
