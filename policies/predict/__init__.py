"""Routing predictors: which experts a generation will use at the coming layers.

`predictor` holds the interface and the registry; each other module is one predictor.
The cache's prefetcher plans with them, and the `predictive` eviction policy ranks by them.
"""
