"""Configurations of :mod:`experiments.train`, one per table of the paper."""
