"""A packaged port: a model repository that carries its own proof.

`manifest` is the `vitport.json` record; `package` writes a port from a report's run;
`standalone` renders its `inference.py`; `publish` puts it on a hub.
"""
