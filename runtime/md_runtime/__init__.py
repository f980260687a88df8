"""md-runtime: the model-serving runtime baked into the md-base images.

Stages of a container's life, one module each: settings -> overrides -> loader -> codecs -> batching -> app
-> metrics -> gunicorn_conf -> cli. Importing this package does nothing but define names.
"""

__version__ = "0.2.0"
