"""The daemon's HTTP admin API (FastAPI, served by uvicorn inside the daemon's loop).

Modules, one job each:

- ``app.py``: ``create_app(daemon)`` builds the FastAPI app and its OpenAPI document;
- ``guard.py``: the auth guard (host, origin, Bearer token, body size) before every route;
- ``errors.py``: CtxStoreError subclasses mapped to HTTP statuses, the error handlers;
- ``invalid_input.py``: what FastAPI refused in a request, in plain words;
- ``context.py``: the daemon handle every route gets (``Ctx``);
- ``fields.py``, ``schemas.py``, ``derive.py``: bodies and parameters; the responses
  that show a store record are made from the record's type;
- ``routes/``: one module per resource (slots, nodes, jobs, ops);
- ``serving.py``: ``ApiServer``, uvicorn on a socket the daemon binds itself.

Nothing here is imported until the daemon serves HTTP: this ``__init__`` imports
nothing, so ``ctxstore.daemon`` without ``--http`` loads neither FastAPI nor uvicorn.
"""
