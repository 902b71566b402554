"""Benchmarks run by ``camim bench`` / ``make bench``.

Every module ``bench/<name>.py`` (not starting with ``_``) is one benchmark with a
``main(argv)`` that prints numbers and ratios; ``camim bench NAME...`` picks some.
Benchmarks print, they never assert timings.
"""
