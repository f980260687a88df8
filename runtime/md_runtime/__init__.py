"""md-runtime: the model-serving runtime baked into the md-base images.

Stages of a container's life, one module (or package) each, in the order data flows; a module imports only
from stages before it (tests/test_compat.py checks it):

    settings -> overrides -> boot -> loader -> codecs -> batching -> metrics -> core -> app -> worker -> master
    -> gunicorn_conf -> cli

with their parts beside them: errors and logs (used by every stage); boot/ (resources, sizing, run_dir);
versions, user_code, spec (model.yaml) and integrated_gradients (the loader's); inference_protocol and
openapi (the app's); checks and deployment (behind `md-runtime check`, `k8s` and `docker-run`). core is the
protocol-free worker (predict and explain with batching, deadlines, timing and counting); app holds only
the HTTP adapters; worker is the gunicorn worker class that holds the HTTP edge (framing, body reading, read
deadlines) whatever gunicorn is installed, and each worker's memory guard; master is what gunicorn's master
does before it forks the workers (load the model once, measure a trial worker, fit the workers). metrics
comes before core because the core counts and times through it. Importing this package does nothing but
define names.
"""

# The stage order, earliest first: a module may import only modules at its own place or before it.
STAGES = (
    "errors", "settings", "logs", "overrides", "boot", "versions", "user_code", "spec", "integrated_gradients",
    "loader",
    "codecs", "batching", "metrics", "core", "inference_protocol", "openapi", "app", "worker", "checks", "master",
    "gunicorn_conf", "deployment", "lifecycle", "sbom", "audit", "cli",
)

__version__ = "0.2.0"
