"""Molecular records, the packed on-disk store, converters, batching and the input pipeline."""
