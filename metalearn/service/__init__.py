"""The runs service and few-shot playground: ``python serve.py`` (FastAPI + uvicorn).

``server.py`` reads serve.py's flags; ``app.py`` wires the routes; ``jobs.py`` runs train.py /
evaluate.py as queued subprocesses, ``progress.py`` reads their output and ``live.py`` streams
it with the run records as server-sent events; ``flags.py`` turns JSON into train.py's validated
argv; ``runs.py`` shows the run records; ``playground.py`` adapts a trained run to drawn tasks on
one worker thread; ``images.py`` decodes drawings; ``security.py`` holds the token, origin and
size checks; ``names.py`` run names; ``errors.py`` the one error shape; ``schemas.py`` bodies.
"""
