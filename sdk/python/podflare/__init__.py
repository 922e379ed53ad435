"""Alias of :mod:`forkbox`, so code written for Podflare's SDK runs unchanged."""
from forkbox import *  # noqa: F401,F403
from forkbox import __all__  # noqa: F401
