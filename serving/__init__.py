"""plantml prediction service: Gunicorn + Flask over an exported bundle, with Prometheus metrics.

Run it with ``plantml-serve --bundle PATH`` (or ``gunicorn -c serving/gunicorn.conf.py
serving.wsgi:app``); settings are environment variables (:mod:`serving.settings`).

This package never imports torch, torchvision, timm or metaflow: it reads the exported
bundle only, through the torch-free parts of :mod:`plantml`. Importing it is cheap; the
inference runtimes are imported when a model is loaded.
"""
