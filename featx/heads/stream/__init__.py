"""Heads trained on rows read block by block from the cache (--solver stream): linear heads, exact kNN, their row sources."""
