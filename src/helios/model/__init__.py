"""The model layer: the transformer's config, kernels, layers and math, and its checkpoint IO (weights, hub).
It imports nothing else from helios."""
