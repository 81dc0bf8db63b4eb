"""The frozen networks: the backbone registry and builders, weights, stage nets, views, evaluation preprocessing."""
