"""themis_engine: training, scoring and evaluation of code reward models on packed, prefix-shared batches."""
