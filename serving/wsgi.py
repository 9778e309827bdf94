"""WSGI entry point: ``gunicorn -c serving/gunicorn.conf.py serving.wsgi:app``.

Imported in each gunicorn worker after the fork (the config sets no ``preload_app``);
by then ``post_fork`` has built this worker's predictor, which :func:`create_app` picks up.
"""

from serving.app import create_app

app = create_app()
