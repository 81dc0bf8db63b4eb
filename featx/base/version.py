"""The featx version, in the base layer so that every stage can record it without importing ``featx``."""

__version__ = "0.1.0"
