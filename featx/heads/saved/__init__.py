"""Saved heads: skops files with a sha256 sidecar, and the allow-list that guards loading them."""
