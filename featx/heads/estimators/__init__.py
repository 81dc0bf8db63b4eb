"""The head estimators themselves: the warm-started C path, the batched torch heads, kNN, few-shot draws, class scores."""
