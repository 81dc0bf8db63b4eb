"""Checks that decide whether a cache may be trusted: attribute limits, damaged rows, signed data roots."""
