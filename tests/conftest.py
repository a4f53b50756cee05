"""Shared fixtures (the 8-CPU-device set-up is in the root conftest.py)."""

import os
import pathlib

import pytest

SHARED_DATA = pathlib.Path(
    os.environ.get("BLAQ_DATA_DIR",
                   pathlib.Path(__file__).resolve().parents[2] / "shared"
                   / "data"))


@pytest.fixture(scope="session")
def shared_data_dir():
  """The read-only MNIST / Fashion-MNIST originals of ../shared/data."""
  if not (SHARED_DATA / "mnist").is_dir():
    pytest.skip(f"MNIST originals not found at {SHARED_DATA} "
                "(set BLAQ_DATA_DIR)")
  return SHARED_DATA
