"""pytest: the pages' ``>>>`` examples are doctests; conf.py is not a test."""

collect_ignore = ["conf.py"]
collect_ignore_glob = ["_build/*"]
