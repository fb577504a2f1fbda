"""Library behind the MAML entry points: data, tasks, networks, algorithms, checkpoints, records."""
