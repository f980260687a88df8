"""resources: CPU limits from fake cgroup v1 and v2 trees."""

from pathlib import Path

from md_runtime.boot.resources import available_cpus, cpu_quota, default_workers, thread_environ, threads_per_worker


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_in_own_cgroup(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/kubepods/pod1\n")
    write(tmp_path, "sys/fs/cgroup/kubepods/pod1/cpu.max", "25000 100000\n")
    assert cpu_quota(tmp_path) == 0.25
    assert default_workers(tmp_path) == 1


def test_v2_parent_limit_applies_when_tighter(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/a/b\n")
    write(tmp_path, "sys/fs/cgroup/a/b/cpu.max", "max 100000\n")
    write(tmp_path, "sys/fs/cgroup/a/cpu.max", "150000 100000\n")
    assert cpu_quota(tmp_path) == 1.5


def test_v2_unlimited_falls_back_to_cpu_count(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "max 100000\n")
    assert cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) >= 1


def test_v1_cfs_quota(tmp_path):
    write(tmp_path, "proc/self/cgroup", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "150000\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path) == 1.5


def test_v1_unlimited_quota_is_none(tmp_path):
    write(tmp_path, "proc/self/cgroup", "4:cpu,cpuacct:/\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path) is None


def test_workers_round_up_and_are_capped_by_online_cpus(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "1000000 100000\n")  # a 10-CPU quota on this smaller machine
    assert default_workers(tmp_path) == max(1, int(available_cpus(Path("/nonexistent"))))


def test_threads_are_each_workers_share_of_the_quota(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/pod\n")
    write(tmp_path, "sys/fs/cgroup/pod/cpu.max", "25000 100000\n")  # 250 millicores
    assert threads_per_worker(1, tmp_path) == 1
    write(tmp_path, "sys/fs/cgroup/pod/cpu.max", "{} 100000\n".format(100000 * min(2, available_cpus())))
    assert threads_per_worker(1, tmp_path) == int(min(2, available_cpus()))
    assert threads_per_worker(8, tmp_path) == 1


def test_thread_variables_leave_the_users_own_alone(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/pod\n")
    write(tmp_path, "sys/fs/cgroup/pod/cpu.max", "25000 100000\n")
    env = thread_environ(2, {"OMP_NUM_THREADS": "3"}, tmp_path)
    assert "OMP_NUM_THREADS" not in env
    assert env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MD_CPU_THREADS"] == "1"
