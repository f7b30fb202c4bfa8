"""Code storage: a tenant's quota on the code its function versions name, and which blobs may leave the control
nodes (nothing names them, past the grace), through the registry's own commands."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from registry.code import CodeStorage
from registry.state import RegistryState
from wire.config import CODE_BLOB_GRACE_S_MAX
from wire.errors import CodeStorageExceededException, ResourceConflictException, ResourceNotFoundException

KB = 1024
SHAS = {c: c * 64 for c in "abcde"}  # package -> its sha256
SIZES = {"a": 300 * KB, "b": 300 * KB, "c": 500 * KB, "d": 10 * KB, "e": 0}


def registry(quota_kb: int = 1000) -> RegistryState:
    s = RegistryState()
    s.code.quota_bytes = quota_kb * KB
    return s


def create(s, name, package, tenant="t"):
    return s.cmd_create_function(0, {"tenant": tenant, "name": name, "handler": "h.fn",
                                     "code_sha256": SHAS[package], "code_size": SIZES[package]})


def update(s, name, package, now=0.0, tenant="t"):
    return s.cmd_update_code(now, tenant, name, SHAS[package], SIZES[package])


def test_each_distinct_package_counts_once_and_past_the_quota_a_change_is_refused():
    s = registry(1000)
    create(s, "f", "a")
    create(s, "g", "a")  # the same package again: nothing more
    s.cmd_publish_version(0, "t", "f")  # nor a version of it
    create(s, "h", "b")
    assert s.code.usage("t") == 600 * KB
    with pytest.raises(CodeStorageExceededException, match="1.1 MB and your quota is 1.0 MB") as refused:
        create(s, "k", "c")
    assert "Delete functions or versions" in refused.value.message
    with pytest.raises(ResourceNotFoundException):
        s.get_function("t", "k")  # a refused create leaves nothing
    create(s, "k", "c", tenant="u")  # another tenant's storage is its own
    update(s, "h", "c")  # replacing h's package frees it: 300 + 500 KB
    assert s.code.usage("t") == 800 * KB and s.get_function("t", "h")["code_sha256"] == SHAS["c"]
    with pytest.raises(CodeStorageExceededException):
        update(s, "g", "b")  # f and its version 1 still name package a: it stays, and b would be more
    assert s.get_function("t", "g")["code_sha256"] == SHAS["a"]  # a refused update changes nothing


def test_the_check_before_an_upload_is_the_one_the_commit_makes():
    s = registry(1000)
    create(s, "f", "c")
    s.check_code("t", "f", SHAS["a"], SIZES["a"], create=False)  # replacing c with a: fine
    with pytest.raises(CodeStorageExceededException):
        s.check_code("t", "g", SHAS["b"], SIZES["b"] + 300 * KB, create=True)
    with pytest.raises(ResourceConflictException):
        s.check_code("t", "f", SHAS["a"], SIZES["a"], create=True)
    with pytest.raises(ResourceNotFoundException, match="Function not found: g"):
        s.check_code("t", "g", SHAS["a"], SIZES["a"], create=False)


def test_a_blob_leaves_when_nothing_names_it_and_its_grace_has_passed():
    s = registry(2000)
    create(s, "f", "a")
    create(s, "g", "b")
    s.cmd_publish_version(0, "t", "g")
    update(s, "g", "c", now=100)  # version 1 still names b
    stored = {SHAS[p]: 0.0 for p in "abcd"}  # d: uploaded, its create never came
    assert s.code.collectable(stored, 5, grace_s=10) == []  # d is within its grace
    assert s.code.collectable(stored, 11, grace_s=10) == [SHAS["d"]]
    s.cmd_delete_function(200, "t", "g")  # b and c are named by nothing now
    assert s.code.collectable(stored, 205, grace_s=10) == [SHAS["d"]]  # an invoke resolved a moment ago may start
    assert s.code.collectable(stored, 211, grace_s=10) == sorted([SHAS["b"], SHAS["c"], SHAS["d"]])
    assert s.code.collectable({SHAS["b"]: 209.0}, 211, grace_s=10) == []  # uploaded again: a create on its way
    create(s, "g", "b")
    assert SHAS["b"] not in s.code.collectable(stored, 1000, grace_s=10)


def test_a_control_node_lacking_a_blob_a_version_names_is_told_to_copy_it():
    s = registry(2000)
    create(s, "f", "a")
    create(s, "g", "b")
    s.cmd_publish_version(0, "t", "g")
    update(s, "g", "c", now=100)  # version 1 still names b
    assert s.code.missing({SHAS["a"]: 0.0, SHAS["d"]: 0.0}) == sorted([SHAS["b"], SHAS["c"]])
    s.cmd_delete_function(200, "t", "g")
    assert s.code.missing({}) == [SHAS["a"]]  # what nothing names is not copied, whatever its grace


def test_releases_are_forgotten_once_no_grace_could_need_them():
    code = CodeStorage()
    code.add("t", "x" * 64, 1)
    code.drop(0, "t", "x" * 64)
    code.add("t", "y" * 64, 1)
    code.drop(CODE_BLOB_GRACE_S_MAX + 1, "t", "y" * 64)
    assert list(code.released) == ["y" * 64]


# --- any sequence of creates, code updates, versions and deletes keeps the books ------------------------------------

TENANTS, NAMES = ("t", "u"), ("f", "g", "h")


class CodeMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.s = registry(800)
        self.now = 0.0

    def _named(self, tenant=None):
        """sha256s the functions' versions name (of `tenant`, or of everyone)."""
        return {r["code_sha256"] for (t, _), e in self.s.functions.items() if tenant in (None, t)
                for r in (e["latest"], *e["versions"].values())}

    @rule(tenant=st.sampled_from(TENANTS), name=st.sampled_from(NAMES), package=st.sampled_from(sorted(SHAS)))
    def create(self, tenant, name, package):
        try:
            create(self.s, name, package, tenant=tenant)
        except (ResourceConflictException, CodeStorageExceededException):
            pass

    @rule(tenant=st.sampled_from(TENANTS), name=st.sampled_from(NAMES), package=st.sampled_from(sorted(SHAS)))
    def update(self, tenant, name, package):
        try:
            update(self.s, name, package, now=self.now, tenant=tenant)
        except (ResourceNotFoundException, CodeStorageExceededException):
            pass

    @rule(tenant=st.sampled_from(TENANTS), name=st.sampled_from(NAMES))
    def publish(self, tenant, name):
        try:
            self.s.cmd_publish_version(self.now, tenant, name)
        except ResourceNotFoundException:
            pass

    @rule(tenant=st.sampled_from(TENANTS), name=st.sampled_from(NAMES))
    def delete(self, tenant, name):
        try:
            self.s.cmd_delete_function(self.now, tenant, name)
        except ResourceNotFoundException:
            pass

    @rule(seconds=st.sampled_from([1, 10, 100]))
    def time_passes(self, seconds):
        self.now += seconds

    @invariant()
    def usage_is_the_distinct_packages_named_and_within_the_quota(self):
        for tenant in TENANTS:
            named = self._named(tenant)
            expected = sum(SIZES[p] for p, sha in SHAS.items() if sha in named)
            assert self.s.code.usage(tenant) == expected <= self.s.code.quota_bytes

    @invariant()
    def only_blobs_nothing_names_may_go(self):
        stored = {sha: 0.0 for sha in SHAS.values()}
        doomed = set(self.s.code.collectable(stored, self.now + 11, grace_s=10))
        assert doomed == set(SHAS.values()) - self._named()
        assert set(self.s.code.holders) == self._named()


CodeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_any_sequence_keeps_the_books = CodeMachine.TestCase
