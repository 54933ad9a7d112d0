"""Service modules that ``tests/test_services.py`` launches as real processes."""
