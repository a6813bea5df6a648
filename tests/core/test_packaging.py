"""The test session itself: it must not write into the user's filter store."""

import os
from pathlib import Path

from kvpress_like.filters import filters_dir
from kvpress_like.models import cache_dir


def test_filter_store_is_private_to_the_session():
    store = filters_dir()
    assert store == Path(os.environ["KVPRESS_LIKE_FILTERS"])
    assert store != cache_dir() / "filters" and not store.is_relative_to(Path.home() / ".cache")
