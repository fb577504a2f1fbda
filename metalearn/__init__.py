"""Library behind the MAML entry points: data, tasks, networks, algorithms, checkpoints, records."""

from metalearn.runtime import prefer_fast_blas

prefer_fast_blas()  # before Paddle's first matrix product, which is when MKL reads it
