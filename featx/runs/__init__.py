"""Runs: orchestration over the stages (read a cache, call the finders and heads, write a run folder)."""
