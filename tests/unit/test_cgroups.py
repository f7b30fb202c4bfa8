"""Per-sandbox cgroups on v1 and v2. This host runs one of them; the other is checked against a directory laid
out as its cgroupfs would be (files the kernel would create are created here beforehand)."""

import os
from pathlib import Path

from worker.cgroups import (
    RECORD,
    CgroupsV1,
    CgroupsV2,
    NoCgroups,
    SandboxCgroupV1,
    SandboxCgroupV2,
    clear_recorded,
    cpu_quota_us,
    host_cgroups,
    parent_name,
)


def test_cpu_follows_memory_as_on_lambda():
    assert cpu_quota_us(1769, cores=2) == 100_000
    assert cpu_quota_us(3538, cores=2) == 200_000
    assert cpu_quota_us(10240, cores=2) == 200_000  # never more than the host has
    assert cpu_quota_us(128, cores=2) == 7_235


def fake_v2(tmp_path: Path) -> tuple[Path, Path]:
    mount = tmp_path / "cgroup"
    (mount / "system.slice" / "flint.service").mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/system.slice/flint.service\n")
    return mount, self_cgroup


def test_v2_sandbox_gets_memory_pids_and_cpu_limits(tmp_path):
    mount, self_cgroup = fake_v2(tmp_path)
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=self_cgroup)
    assert isinstance(cg, CgroupsV2) and cg.version == 2 and cg.available, cg.reason
    parent = mount / "system.slice" / "flint.service" / "flint-n1"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    sandbox = cg.create("sb1", memory_mb=512, pids_max=64, cores=2)
    d = parent / "sb1"
    assert (d / "memory.max").read_text() == str(512 * 1024 * 1024)
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == f"{cpu_quota_us(512, 2)} 100000"
    assert isinstance(sandbox, SandboxCgroupV2) and sandbox.procs_files == [str(d / "cgroup.procs")]
    sandbox.configure(256)
    assert (d / "memory.max").read_text() == str(256 * 1024 * 1024)


def test_v2_without_the_controllers_says_why(tmp_path):
    mount, self_cgroup = fake_v2(tmp_path)
    (mount / "cgroup.controllers").write_text("cpu io\n")
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=self_cgroup)
    assert isinstance(cg, NoCgroups) and not cg.available and "lacks controllers" in cg.reason


def test_v1_sandbox_gets_one_group_per_controller(tmp_path):
    mount = tmp_path / "cgroup"
    for c in ("memory", "pids", "cpu"):
        (mount / c / "worker").mkdir(parents=True)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("9:pids:/worker\n4:memory:/worker\n2:cpu:/worker\n")
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=self_cgroup)
    assert isinstance(cg, CgroupsV1) and cg.version == 1, cg.reason
    sandbox = cg.create("sb1", memory_mb=1769, pids_max=32, cores=2)
    assert (mount / "memory/worker/flint-n1/sb1/memory.limit_in_bytes").read_text() == str(1769 * 1024 * 1024)
    assert (mount / "pids/worker/flint-n1/sb1/pids.max").read_text() == "32"
    assert (mount / "cpu/worker/flint-n1/sb1/cpu.cfs_quota_us").read_text() == "100000"
    assert isinstance(sandbox, SandboxCgroupV1) and len(sandbox.procs_files) == 3


def test_v1_with_a_freezer_hierarchy_freezes_and_thaws_a_sandbox_and_keeps_the_kernels_switch_on(tmp_path):
    mount = tmp_path / "cgroup"
    for c in ("memory", "pids", "cpu", "freezer"):
        (mount / c / "worker").mkdir(parents=True)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("9:pids:/worker\n6:freezer:/worker\n4:memory:/worker\n2:cpu:/worker\n")
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=self_cgroup)
    assert isinstance(cg, CgroupsV1) and cg.freezer
    assert (mount / "freezer/worker/flint-n1/keep-frozen/freezer.state").read_text() == "FROZEN"
    state = mount / "freezer/worker/flint-n1/sb1/freezer.state"
    state.parent.mkdir()
    state.write_text("THAWED")  # as the kernel makes it
    sandbox = cg.create("sb1", memory_mb=128, pids_max=32, cores=2)
    assert sandbox.freezer == state and str(state.parent / "cgroup.procs") in sandbox.procs_files
    sandbox.freeze()
    assert state.read_text() == "FROZEN"
    sandbox.thaw()
    assert state.read_text() == "THAWED"


def test_v1_without_a_freezer_hierarchy_has_no_freezer(tmp_path):
    mount = tmp_path / "cgroup"
    for c in ("memory", "pids", "cpu"):
        (mount / c / "worker").mkdir(parents=True)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("9:pids:/worker\n4:memory:/worker\n2:cpu:/worker\n")
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=self_cgroup)
    sandbox = cg.create("sb1", memory_mb=128, pids_max=32, cores=2)
    assert not cg.freezer and sandbox.freezer is None
    sandbox.freeze()  # nothing to write: a no-op
    sandbox.thaw()


def fake_v1(tmp_path: Path, worker: str = "worker", freezer: bool = True) -> tuple[Path, Path]:
    mount = tmp_path / "cgroup"
    for c in ("memory", "pids", "cpu", "freezer"):
        (mount / c / worker).mkdir(parents=True, exist_ok=True)
    self_cgroup = tmp_path / f"self_cgroup_{worker}"
    self_cgroup.write_text(f"9:pids:/{worker}\n4:memory:/{worker}\n2:cpu:/{worker}\n"
                           + (f"6:freezer:/{worker}\n" if freezer else ""))
    return mount, self_cgroup


def test_groups_left_by_an_earlier_run_are_thawed_and_cleared_at_start(tmp_path):
    mount, self_cgroup = fake_v1(tmp_path)
    # an earlier process of this node, SIGKILLed: its pid is anyone's by now (here: ours), its groups all stale
    for group in ("slot-999999999-1", f"slot-{os.getpid()}-1"):
        for c in ("memory", "pids", "cpu"):
            (mount / c / "worker" / "flint-n1" / group).mkdir(parents=True)
        state = mount / "freezer/worker/flint-n1" / group / "freezer.state"
        state.parent.mkdir(parents=True)
        state.write_text("FROZEN")  # its processes would never die of their parent's death signal
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=self_cgroup)
    assert isinstance(cg, CgroupsV1)
    for group in ("slot-999999999-1", f"slot-{os.getpid()}-1"):
        for c in ("memory", "pids", "cpu"):  # a real cgroupfs removes the group; here rmdir only empties it
            assert not (mount / c / "worker" / "flint-n1" / group).exists()
        assert (mount / "freezer/worker/flint-n1" / group / "freezer.state").read_text() == "THAWED"
    assert (mount / "freezer/worker/flint-n1/keep-frozen/freezer.state").read_text() == "FROZEN"


def test_a_start_clears_the_parents_an_earlier_start_recorded_wherever_they_were(tmp_path):
    record = tmp_path / "data" / RECORD
    mount, first = fake_v1(tmp_path, "session-a", freezer=False)
    host_cgroups("flint-n1", mount=mount, self_cgroup=first, record=record)
    for c in ("memory", "pids", "cpu"):  # a sandbox's groups, as the kernel leaves them once its processes died
        (mount / c / "session-a/flint-n1/slot-999999999-0").mkdir()
    assert str(mount / "memory/session-a/flint-n1") in record.read_text()
    # the node is SIGKILLed and started again from another cgroup (another session, another unit)
    _, second = fake_v1(tmp_path, "session-b", freezer=False)
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=second, record=record)
    assert not any((mount / c / "session-a/flint-n1").exists() for c in ("memory", "pids", "cpu"))
    assert str(mount / "memory/session-b/flint-n1") in record.read_text() and "session-a" not in record.read_text()
    for c in ("memory", "pids", "cpu"):
        (mount / c / "session-b/flint-n1/slot-999999999-1").mkdir()
    cg.close()  # a clean stop leaves nothing, the parents included
    assert not record.exists()
    assert not any((mount / c / "session-b/flint-n1").exists() for c in ("memory", "pids", "cpu"))
    clear_recorded(record)  # nothing recorded: nothing to do


def test_a_group_that_will_not_go_stays_recorded_until_it_does(tmp_path):
    record = tmp_path / "data" / RECORD
    mount, first = fake_v1(tmp_path, "session-a", freezer=False)
    host_cgroups("flint-n1", mount=mount, self_cgroup=first, record=record)
    stuck = mount / "pids/session-a/flint-n1/slot-999999999-0"
    stuck.mkdir()
    (stuck / "held").write_text("")  # the kernel would not let it go yet
    _, second = fake_v1(tmp_path, "session-b", freezer=False)
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=second, record=record)
    assert str(stuck.parent) in record.read_text().splitlines()  # not forgotten: tried again at the stop
    (stuck / "held").unlink()
    cg.close()
    assert not stuck.parent.exists() and not record.exists()


def test_parents_are_named_per_node_and_data_dir(tmp_path):
    a, b = parent_name("n1", tmp_path / "a" / "n1"), parent_name("n1", tmp_path / "b" / "n1")
    assert a != b and a.startswith("flint-n1-") and b.startswith("flint-n1-")
    assert parent_name("n1", tmp_path / "a" / "n1") == a  # stable: a restart finds what it left
    assert parent_name("n2", tmp_path / "a" / "n1") != a


def test_v2_freezes_through_cgroup_freeze_where_the_kernel_has_it(tmp_path):
    mount, self_cgroup = fake_v2(tmp_path)
    parent = mount / "system.slice" / "flint.service" / "flint-n1"
    parent.mkdir()
    (parent / "cgroup.freeze").write_text("0")  # Linux 5.2 and later: in every non-root group
    cg = host_cgroups("flint-n1", mount=mount, self_cgroup=self_cgroup)
    assert isinstance(cg, CgroupsV2) and cg.freezer
    (parent / "sb1").mkdir()
    (parent / "sb1" / "cgroup.freeze").write_text("0")
    sandbox = cg.create("sb1", memory_mb=128, pids_max=32, cores=2)
    sandbox.freeze()
    assert (parent / "sb1" / "cgroup.freeze").read_text() == "1"
    sandbox.thaw()
    assert (parent / "sb1" / "cgroup.freeze").read_text() == "0"
