"""Stage 3, audit: label errors, duplicates and outliers found on cached features, as pure functions over arrays."""
