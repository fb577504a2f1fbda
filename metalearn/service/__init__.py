"""The runs service and few-shot playground: ``python serve.py`` (FastAPI + uvicorn).

``app.py`` wires the routes; ``jobs.py`` runs train.py / evaluate.py as queued subprocesses and
``progress.py`` reads their output; ``flags.py`` turns JSON into train.py's validated argv;
``runs.py`` is the view of the run records; ``playground.py`` adapts a trained run to drawn tasks
on one worker thread; ``images.py`` decodes drawings; ``security.py`` holds token and size limits.
"""
