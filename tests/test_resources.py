"""resources: CPU limits from fake cgroup v1 and v2 trees."""

from pathlib import Path

from md_runtime.resources import available_cpus, cpu_quota, default_workers


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
