"""Interfaces that tests/test_codegen.py exports, regenerates and talks to."""
