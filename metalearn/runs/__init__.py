"""What a run leaves in ``work_dir``: checkpoints, the records database, curves, and runs.py.

``checkpoint.py`` reads and writes .npz checkpoints (no pickle, atomic); ``records.py`` is the
records' interface, over ``schema.py`` (tables, migrations), ``db.py`` (queries),
``sessions.py`` (the writers) and ``liveness.py`` (is a run's owner alive); ``names.py`` is the
rule for run names; ``plots.py`` draws curves; ``cli.py`` is runs.py.
"""
