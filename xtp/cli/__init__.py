"""The ``xtp`` command line (``xtp --help``)."""
