"""Helper processes for ``tests/test_objects.py`` (objects passed by reference between processes)."""
