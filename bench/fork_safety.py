"""Which frameworks survive a fork after loading a model: the study behind MD_PRELOAD=auto.

With preloading the gunicorn master loads package.py and forks the workers, so each framework's state crosses
a fork. For each framework installed here, a small model is trained in a helper process and saved; then, in
a fresh process, it is loaded from its file (as package.py does), the process forks, and the child predicts
under an alarm. Two cases: fork right after loading (what preload does), and fork after the parent has also
predicted once (what a package.py that warms its model up in get_model() does). The parent's thread count
after each step shows which libraries started thread pools, which do not cross a fork.

    python bench/fork_safety.py [--threads 2] [--frameworks numpy sklearn ...]   # a markdown table
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HANG_SECONDS = 30

TRAIN = {
    "numpy": "import numpy as np; np.save(PATH + '.npy', np.random.rand(800, 800))",
    "sklearn": (
        "import pickle; from sklearn.datasets import make_classification; "
        "from sklearn.ensemble import HistGradientBoostingClassifier as M; X, y = make_classification(2000, 20); "
        "pickle.dump(M(max_iter=20).fit(X, y), open(PATH, 'wb'))"
    ),
    "xgboost": (
        "import xgboost as xgb; from sklearn.datasets import make_classification; X, y = make_classification(2000, 20); "
        "xgb.XGBClassifier(n_estimators=20, n_jobs=THREADS).fit(X, y).save_model(PATH + '.json')"
    ),
    "lightgbm": (
        "import lightgbm as lgb; from sklearn.datasets import make_classification; X, y = make_classification(2000, 20); "
        "lgb.LGBMClassifier(n_estimators=20, n_jobs=THREADS, verbose=-1).fit(X, y).booster_.save_model(PATH + '.txt')"
    ),
    "catboost": (
        "import catboost as cb; from sklearn.datasets import make_classification; X, y = make_classification(2000, 20); "
        "cb.CatBoostClassifier(iterations=20, thread_count=THREADS, verbose=0, allow_writing_files=False).fit(X, y).save_model(PATH + '.cbm')"
    ),
    "torch": (
        "import torch; torch.save(torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), "
        "torch.nn.Linear(512, 2)).state_dict(), PATH + '.pt')"
    ),
    "tensorflow": (
        "import tensorflow as tf; m = tf.keras.Sequential([tf.keras.Input((20,)), tf.keras.layers.Dense(64), "
        "tf.keras.layers.Dense(2)]); m.save(PATH + '.keras')"
    ),
}

LOAD = {
    "numpy": "import numpy as np; w = np.load(PATH + '.npy'); predict = lambda: (w @ w).sum()",
    "sklearn": (
        "import pickle, numpy as np; m = pickle.load(open(PATH, 'rb')); X = np.random.rand(5000, 20); "
        "predict = lambda: m.predict(X)"
    ),
    "xgboost": (
        "import xgboost as xgb, numpy as np; m = xgb.XGBClassifier(); m.load_model(PATH + '.json'); "
        "X = np.random.rand(5000, 20); predict = lambda: m.predict(X)"
    ),
    "lightgbm": (
        "import lightgbm as lgb, numpy as np; m = lgb.Booster(model_file=PATH + '.txt'); X = np.random.rand(5000, 20); "
        "predict = lambda: m.predict(X)"
    ),
    "catboost": (
        "import catboost as cb, numpy as np; m = cb.CatBoostClassifier(); m.load_model(PATH + '.cbm'); "
        "X = np.random.rand(5000, 20); predict = lambda: m.predict(X)"
    ),
    "torch": (
        "import torch; m = torch.nn.Sequential(torch.nn.Linear(512, 512), "
        "torch.nn.ReLU(), torch.nn.Linear(512, 2)); m.load_state_dict(torch.load(PATH + '.pt')); "
        "X = torch.rand(4096, 512); predict = lambda: m(X).sum().item()"
    ),
    "tensorflow": (
        "import tensorflow as tf, numpy as np; m = tf.keras.models.load_model(PATH + '.keras'); "
        "X = np.random.rand(5000, 20).astype('float32'); predict = lambda: m.predict(X, verbose=0)"
    ),
}

VERSION = {"sklearn": "sklearn"}  # the module whose __version__ names the framework, where the names differ

TRIAL = """
import os, sys
sys.path.insert(0, RUNTIME)
from md_runtime.boot.resources import no_thread_pools, set_worker_threads, thread_count
import contextlib
with (no_thread_pools() if MD else contextlib.nullcontext()):
    {load}
    after_load = thread_count()
    if WARM:
        predict()
after_warm = thread_count()
child = os.fork()
if child == 0:
    import signal
    signal.alarm(HANG)  # no handler: the kernel ends a child stuck in C code
    if MD:
        set_worker_threads(THREADS)
    predict()
    print(thread_count(), flush=True)
    os._exit(0)
_, status = os.waitpid(child, 0)
print(after_load, after_warm, status)
"""

RUNTIME = str(Path(__file__).resolve().parent.parent / "runtime")
CASES = (("fork after loading", False, False), ("fork after loading and one predict", True, False),
         ("md-runtime's preload: fork after loading with no thread pools", False, True),
         ("md-runtime's preload, and one predict before the fork", True, True))


def _source(template: str, path: str, threads: int) -> str:
    return template.replace("PATH", repr(path)).replace("THREADS", str(threads))


def _run(code: str, threads: int = 0) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose libraries may use `threads` threads, as md-runtime's workers would."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_SECONDS * 3, env=env)


def _outcome(status: int) -> str:
    if os.WIFEXITED(status):
        return "ok" if os.WEXITSTATUS(status) == 0 else "error (exit {})".format(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    return "hang (killed after {} s)".format(HANG_SECONDS) if sig == signal.SIGALRM else "crash ({})".format(signal.Signals(sig).name)


def study(framework: str, threads: int, workdir: Path) -> str:
    path = str(workdir / framework)
    trained = _run(_source(TRAIN[framework], path, threads))
    if trained.returncode != 0:
        return "| {} | not installed or failed to train: {} |||".format(framework, trained.stderr.strip().splitlines()[-1:])
    module = VERSION.get(framework, framework)
    version = _run("import {0}; print({0}.__version__)".format(module)).stdout.strip()
    cells = []
    for _, warm, md in CASES:
        code = TRIAL.format(load=_source(LOAD[framework], path, threads)).replace("RUNTIME", repr(RUNTIME))
        code = code.replace("WARM", str(warm)).replace("MD", str(md)).replace("HANG", str(HANG_SECONDS))
        done = _run(code.replace("THREADS", str(threads)), threads)
        if done.returncode != 0:
            cells.append("error: " + (done.stderr.strip().splitlines() or ["?"])[-1][:80])
            continue
        *child, after_load, after_warm, status = (int(v) for v in done.stdout.split())
        threads_seen = "parent: {} thread(s) loaded{}".format(after_load, ", {} after predict".format(after_warm) if warm else "")
        if child:
            threads_seen += "; child: {} after predict".format(child[-1])
        cells.append("{} ({})".format(_outcome(status), threads_seen))
    return "| {} {} | {} |".format(framework, version, " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads each framework may use (default 2)")
    parser.add_argument("--frameworks", nargs="*", default=list(TRAIN), choices=list(TRAIN))
    args = parser.parse_args()
    print("Python {}, {} thread(s) per framework\n".format(sys.version.split()[0], args.threads))
    print("| framework | {} |".format(" | ".join(case[0] for case in CASES)))
    print("|---" * (len(CASES) + 1) + "|")
    with tempfile.TemporaryDirectory() as workdir:
        for framework in args.frameworks:
            print(study(framework, args.threads, Path(workdir)), flush=True)


if __name__ == "__main__":
    main()
