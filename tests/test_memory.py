"""Memory, on real servers: the model loaded once in the master and shared by the workers it forks (MD_PRELOAD),
the start-up check's prediction against what the replica really holds (the PSS of its processes), fewer
workers or a clear error when they do not fit, and the guard that recycles a worker outgrowing its share and
answers 507 to a request that would."""

import mmap
import os
import re
import shutil
import signal
import time

import pytest
import requests

from md_runtime.boot.resources import mapped_file_kib, private_anonymous_mib, process_memory
from support import FIXTURE_MODELS, Server, md_runtime, runtime_env

ALLOCATES = FIXTURE_MODELS / "allocates_memory"


def replica_memory(server: Server) -> float:
    """What the replica holds, in MiB, as if it were alone on the machine (in a container, the sum of its
    processes' PSS): their share of the anonymous pages, which only they map, and each part of a file that any
    of them maps, counted once at the most any of them holds of it. Plain PSS here would also split the
    library pages with whatever else runs on this machine."""
    pids = [str(pid) for pid in [server.process.pid] + server.workers()]
    memories = [memory for memory in map(process_memory, pids) if memory is not None]
    files: dict = {}
    for pid in pids:
        for part, kib in mapped_file_kib(pid).items():
            files[part] = max(files.get(part, 0), kib)
    return sum(memory.anonymous_pss for memory in memories) + sum(files.values()) / 1024


def predict_on_fresh_connections(server: Server, rows, times: int) -> set:
    """`times` predictions, each on a new connection so that every worker gets some; the pids that answered."""
    pids = set()
    for _ in range(times):
        answer = requests.post(server.url + "/predict", json=rows, headers={"Connection": "close"}, timeout=30)
        assert answer.status_code == 200, answer.text
        pids.update(row.get("pid") for row in answer.json())
    return pids


def memory_plan(server: Server) -> dict:
    return server.get("/info").json()["memory"]


def metric(server: Server, pattern: str) -> float:
    found = re.findall(pattern + r" ([0-9.e+]+)", server.get("/metrics").text)
    return sum(float(value) for value in found)


@pytest.mark.parametrize("model, workers, preload", [
    ("iris", 1, "auto"), ("iris", 3, "auto"), ("iris", 2, "false"), ("no-op", 1, "auto"), ("no-op", 2, "auto"),
])
def test_the_predicted_replica_memory_is_within_10_percent_of_what_it_holds(model, workers, preload, iris_model_dir):
    model_dir = iris_model_dir if model == "iris" else ALLOCATES
    rows = [{"mib": 0, "keep": False}] if model == "no-op" else \
        [dict(zip(["sepal_length", "sepal_width", "petal_length", "petal_width"], [5.1, 3.5, 1.4, 0.2]))]
    env = runtime_env(MD_PRELOAD=preload, MD_MEMORY_MIB="4000")
    with Server(model_dir, "--workers", str(workers), env=env).wait_ready() as server:
        server.wait_for_workers(workers)
        loads = 1 if preload != "false" else workers  # /ready answers once the first worker has loaded
        deadline = time.monotonic() + 60
        while server.output().count("loaded model from") < loads and time.monotonic() < deadline:
            time.sleep(0.1)
        predict_on_fresh_connections(server, rows, 20 * workers)
        time.sleep(1.5)  # the workers' memory settles (the guard's first reading, the allocator)
        measured, plan = replica_memory(server), memory_plan(server)
    assert plan["preload"] is (preload != "false") and plan["workers"] == workers
    assert abs(plan["replica_mib"] - measured) <= 0.1 * measured, (plan["replica_mib"], measured, plan)


def test_what_each_worker_adds_leaves_out_a_library_installed_moments_ago(tmp_path):
    """An override installed at start leaves its files' pages dirty in the page cache for up to 30 s; the first
    process to map them counts them as Private_Dirty, but every worker shares them: not per worker."""
    library = tmp_path / "library.so"
    library.write_bytes(os.urandom(32 << 20))
    before = private_anonymous_mib()
    with library.open("rb") as opened, mmap.mmap(opened.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        sum(mapped[offset] for offset in range(0, len(mapped), mmap.PAGESIZE))
        # A fresh anonymous mapping, written: malloc may hand back heap pages an earlier test freed, still resident
        with mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as allocated:
            allocated[::mmap.PAGESIZE] = b"\x01" * (len(allocated) // mmap.PAGESIZE)
            grew = private_anonymous_mib() - before
    assert 15 <= grew <= 20, grew


def test_the_workers_share_the_model_the_master_loaded_once(tmp_path):
    loads = tmp_path / "loads.txt"
    env = runtime_env(LOADS_FILE=str(loads), MD_MEMORY_MIB="4000")
    big = [{"mib": 0, "keep": False}]
    with Server(ALLOCATES, "--workers", "3", env=env).wait_ready() as server:
        assert memory_plan(server)["preload"] is True
        first = server.wait_for_workers(3)
        assert predict_on_fresh_connections(server, big, 30) <= set(first)
        assert loads.read_text().split() == [str(server.process.pid)], "loaded once, in the master"
        os.kill(first[0], signal.SIGKILL)
        server.wait_for_workers(3, but_not=[first[0]])
        predict_on_fresh_connections(server, big, 10)
        assert loads.read_text().split() == [str(server.process.pid)], "the respawned worker got the master's model"


def test_without_preloading_each_worker_loads_its_own_copy(tmp_path):
    loads = tmp_path / "loads.txt"
    env = runtime_env(LOADS_FILE=str(loads), MD_PRELOAD="false")
    with Server(ALLOCATES, "--workers", "2", env=env).wait_ready() as server:
        info = memory_plan(server)
        assert (info["preload"], info["preload_reason"]) == (False, "MD_PRELOAD=false")
        workers = server.wait_for_workers(2)
        server.wait_ready()
        deadline = time.monotonic() + 30
        while len(loads.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(map(int, loads.read_text().split())) == workers


def test_auto_loads_in_each_worker_when_package_py_imports_tensorflow(tmp_path):
    from md_runtime.master import preload_decision
    from md_runtime.settings import read_settings

    model = tmp_path / "tf"
    model.mkdir()
    (model / "package.py").write_text("import tensorflow as tf\n\ndef get_model():\n    return tf.keras.models.load_model('m')\n")
    assert preload_decision(read_settings({}, model_dir=str(model))) == (
        False, "package.py imports tensorflow, which does not survive a fork")
    assert preload_decision(read_settings({}, model_dir=str(model), preload="true"))[0] is True


def test_auto_starts_again_without_preloading_when_loading_brought_in_tensorflow(tmp_path):
    model = tmp_path / "indirect"
    shutil.copytree(ALLOCATES, model)
    (model / "vendored" / "tensorflow").mkdir(parents=True)
    (model / "vendored" / "tensorflow" / "__init__.py").write_text("")
    source = (model / "package.py").read_text()
    (model / "package.py").write_text(source.replace("def get_model():", (
        "def get_model():\n    import importlib, sys\n    sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'vendored'))\n"
        "    importlib.import_module('tensor' + 'flow')  # out of sight of package.py's imports, as unpickling is\n")))
    loads = tmp_path / "loads.txt"
    with Server(model, "--workers", "1", env=runtime_env(LOADS_FILE=str(loads))).wait_ready() as server:
        info = memory_plan(server)
        assert predict_on_fresh_connections(server, [{"mib": 1, "keep": False}], 2) == set(server.workers())
    assert info["preload"] is False and info["preload_reason"] == "MD_PRELOAD=false"
    assert "loading the model imported tensorflow, which does not survive a fork; starting again" in server.output()
    assert len(loads.read_text().split()) == 2, "once in the first master, then in the worker"
    forced = Server(model, "--workers", "1", env=runtime_env(MD_PRELOAD="true"))
    assert forced.wait_exit() == 3
    assert forced.output().strip().splitlines()[-1] == (
        "md-runtime: error: MD_PRELOAD=true, but loading the model imported tensorflow, which does not survive a "
        "fork; set MD_PRELOAD=false")


def test_auto_starts_again_without_preloading_when_a_trial_worker_hangs():
    env = runtime_env(MD_REQUEST_TIMEOUT="3")  # the trial's deadline
    with Server(FIXTURE_MODELS / "hangs_after_fork", "--workers", "2", env=env).wait_ready() as server:
        assert memory_plan(server)["preload"] is False
        assert server.post("/predict", json=[{"x": 1}]).json() == [{"y": 1.0}]
    assert "a trial worker forked from the master failed: it did not predict within 3 s" in server.output()


def test_fewer_workers_start_when_only_fewer_fit():
    env = runtime_env(MD_PRELOAD="false", BIG_MIB="100")
    holds = FIXTURE_MODELS / "holds_memory"
    with Server(holds, "--workers", "1", env=dict(env, MD_MEMORY_MIB="4000")).wait_ready() as server:
        plan = memory_plan(server)
    two = plan["master_mib"] + 2 * plan["worker_mib"]
    limit = int((plan["replica_mib"] + two) / 2 * 1.1)  # room for one worker with headroom, not for two
    with Server(holds, "--workers", "2", env=dict(env, MD_MEMORY_MIB=str(limit))).wait_ready() as server:
        assert memory_plan(server)["workers"] == 1 and len(server.workers()) == 1
        assert server.post("/predict", json=[{"x": 1}]).json() == [{"y": 1.0}]
    assert "starting 1 worker(s) instead of 2" in server.output()


def test_a_model_that_does_not_fit_is_refused_with_the_memory_to_ask_for_and_serves_with_it():
    env = runtime_env(BIG_MIB="300", MD_MEMORY_MIB="200", MD_PRELOAD="false")  # each worker holds 300 MiB
    holds = FIXTURE_MODELS / "holds_memory"
    refused = Server(holds, "--workers", "2", env=env)
    assert refused.wait_exit() == 3
    last = refused.output().strip().splitlines()[-1]
    assert re.fullmatch(r"md-runtime: error: ModelServeError: the model does not fit: master \d+ MiB \+ \d+ MiB per worker; "
                        r"this replica has 200 MiB for 2 worker\(s\); deploy with memory=\d+ \(MiB\) or more, \d+ for all "
                        r"2 workers", last), last
    one, two = int(re.search(r"memory=(\d+)", last).group(1)), int(re.search(r"(\d+) for all", last).group(1))
    assert 300 < one < two
    with Server(holds, "--workers", "2", env=dict(env, MD_MEMORY_MIB=str(two))).wait_ready() as server:
        assert memory_plan(server)["workers"] == 2
        workers = server.wait_for_workers(2)
        assert server.post("/predict", json=[{"x": 1}]).json() == [{"y": 1.0}]
        time.sleep(3)  # three readings of the guard: workers at their measured size, in a tight fit, are kept
        assert server.workers() == workers
        measured = replica_memory(server)
    assert measured < two, "the memory it asked for holds the replica"
    assert "replacing it" not in server.output()


def test_a_worker_outgrowing_its_share_is_recycled_and_counted():
    env = runtime_env(MD_MEMORY_MIB="400")
    leak = [{"mib": 40, "keep": True}]
    with Server(ALLOCATES, "--workers", "1", env=env).wait_ready() as server:
        plan = memory_plan(server)
        share, recycle = plan["worker_share_mib"], plan["worker_recycle_mib"]
        assert plan["worker_mib"] < recycle < share
        first = server.workers()
        for _ in range(int(share // 40)):  # a leak, slower than the guard's readings: replaced before it fails
            if server.workers() != first:
                break
            assert server.post("/predict", json=leak).status_code == 200
            time.sleep(1.2)
        server.wait_for_workers(1, but_not=first)
        server.wait_ready()
        assert server.post("/predict", json=[{"mib": 1, "keep": False}]).status_code == 200
        assert metric(server, r'md_worker_recycled_total\{reason="memory"\}') == 1
        assert metric(server, r'md_worker_memory_bytes\{pid="%d"\}' % server.workers()[0]) > 0
    assert "near its share of the replica's memory ({:.0f} of {:.0f} MiB): replacing it".format(recycle, share) in server.output()


def test_a_request_that_would_outgrow_the_workers_share_gets_507_and_the_worker_serves_on():
    env = runtime_env(MD_MEMORY_MIB="400")
    with Server(ALLOCATES, "--workers", "1", env=env).wait_ready() as server:
        pid = server.workers()
        answer = server.post("/predict", json=[{"mib": 1000, "keep": False}])
        assert answer.status_code == 507, answer.text
        assert answer.json()["error"] == "out_of_memory"
        assert answer.json()["message"].startswith("predict() ran out of memory (Unable to allocate 1000. MiB")
        assert server.post("/predict", json=[{"mib": 50, "keep": False}]).json()[0]["allocated_mib"] == 50
        assert server.workers() == pid
        assert metric(server, r'md_predict_errors_total\{kind="out_of_memory"\}') == 1


def data_room_kib(pid: int) -> int:
    """What `pid` may still map before its data limit (RLIMIT_DATA) makes an allocation fail."""
    with open("/proc/{}/status".format(pid)) as status, open("/proc/{}/limits".format(pid)) as limits:
        vm_data = int(re.search(r"VmData:\s+(\d+) kB", status.read()).group(1))
        limit = int(re.search(r"Max data size\s+(\d+)", limits.read()).group(1))
    return limit // 1024 - vm_data


def test_a_first_json_request_leaves_the_workers_share_to_its_predictions():
    """orjson before 3.11 maps an 8 MiB buffer the first time it parses, mostly never touched: counted against
    the worker's limit, a small model at the platform's minimum memory answered 507 to 1-MiB predictions. Current
    orjson maps nothing, so this can fail only on the images' pins (the seed-pin run inside python-39)."""
    with Server(ALLOCATES, "--workers", "1", env=runtime_env(MD_MEMORY_MIB="400")).wait_ready() as server:
        pid = server.wait_for_workers(1)[0]
        before = data_room_kib(pid)
        assert server.post("/predict", json=[{"mib": 0, "keep": False}] * 100).status_code == 200
        assert before - data_room_kib(pid) < 2048, (before, data_room_kib(pid))


def test_check_prints_the_memory_for_each_worker_count(iris_model_dir):
    done = md_runtime("check", str(iris_model_dir), "--workers", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("memory (the model loaded once, shared by the workers): master ") for line in lines)
    asks = [int(line.split("memory=")[1]) for line in lines if "worker(s):" in line]
    assert len(asks) == 3 and 150 <= asks[0] < asks[1] < asks[2] <= 512, lines


def test_docker_run_and_k8s_take_memory_auto_from_what_check_measures(iris_model_dir):
    image = "md-base/python/machine-learning:1.1.0"
    check = md_runtime("check", str(iris_model_dir), "--workers", "2")
    asked = int(re.findall(r"deploy with memory=(\d+)", check.stdout)[-1])
    line = md_runtime("docker-run", str(iris_model_dir), "--image", image, "--cpu", "2000", "--memory", "auto")
    assert line.returncode == 0, line.stderr
    given = int(re.search(r"--memory (\d+)m -e MD_MEMORY_MIB=\1 ", line.stdout).group(1))
    assert abs(given - asked) <= 16, "measured again: the same, give or take a step"
    assert "memory auto: {} MiB for 2 worker(s)".format(given) in line.stderr
    k8s = md_runtime("k8s", "iris", "--image", image, "--cpu", "2000", "--memory", "auto", "--model-dir", str(iris_model_dir))
    assert k8s.returncode == 0 and abs(int(re.search(r'memory: "(\d+)Mi"', k8s.stdout).group(1)) - asked) <= 16
    blind = md_runtime("k8s", "iris", "--image", image, "--memory", "auto")
    assert (blind.returncode, blind.stderr.strip()) == (
        2, "md-runtime: error: --memory auto measures the model: pass its directory (--model-dir DIR)")


def test_the_masters_objects_are_frozen_out_of_the_collector(fixture_models):
    """A collection in a worker writes to every object it scans: unfrozen, the master's objects would be copied
    into each worker at its first full collection."""
    import gc

    from md_runtime.master import load_once
    from md_runtime.settings import read_settings

    gc.unfreeze()
    try:
        load_once(read_settings({}, model_dir=str(fixture_models / "sums_columns")))
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_the_memory_asked_for_is_rounded_up_to_what_a_deployment_may_have():
    from md_runtime.boot.sizing import Footprint, ask_mib, fit_workers
    from md_runtime.errors import MemoryLimitError

    tiny = Footprint(master_mib=60.0, worker_mib=10.0, files_mib=0.0, predicted=True, preloaded=True)
    assert ask_mib(tiny, 1) == 150, "at least the platform's minimum"
    assert ask_mib(Footprint(300.0, 20.0, 1.0, True, True), 2) % 8 == 0
    with pytest.raises(MemoryLimitError, match=r"it needs about 2[0-9]{4} MiB, more than a deployment may have "
                                               r"\(16384 MiB\): make the model smaller"):
        fit_workers(Footprint(20000.0, 10.0, 0.0, True, True), 1, 16384.0)


def test_a_request_too_big_to_decode_in_the_workers_share_gets_507_naming_the_request():
    rows = 6000000
    body = b'{"columns": ["mib", "keep"], "data": [' + b",".join([b"[0,false]"] * rows) + b"]}"
    with Server(ALLOCATES, "--workers", "1", env=runtime_env(MD_MEMORY_MIB="250")).wait_ready() as server:
        assert len(body) < 100 * 2 ** 20 < memory_plan(server)["worker_share_mib"] * 2 ** 20
        answer = server.post("/predict", data=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 507, answer.text[:500]
        assert answer.json()["message"].startswith("the request ran out of memory")
        assert server.post("/predict", json=[{"mib": 1, "keep": False}]).status_code == 200
