import pytest

from wire.config import ConfigError, NodeConfig, Settings


def good(**over):
    raw = {"node_id": "n1", "az": "az1", "address": "127.0.0.2", "roles": ["control", "worker"],
           "control_nodes": ["127.0.0.2"], "data_dir": "/tmp/x"}
    raw.update(over)
    return raw


def test_defaults_and_endpoints():
    c = NodeConfig.from_dict(good(settings={"keep_alive_s": 5}))
    assert c.settings.keep_alive_s == 5.0 and c.settings.heartbeat_interval_s == 0.5
    assert c.endpoint("frontend") == "tcp://127.0.0.2:7100"
    assert c.raft_address("counting") == "127.0.0.2:7201"


@pytest.mark.parametrize(
    "over, complaint",
    [
        ({"roles": ["chef"]}, "unknown role 'chef'"),
        ({"control_nodes": ["127.0.0.9"]}, "must be in control_nodes"),
        ({"settings": {"keep_alive": 1}}, "unknown key 'keep_alive'"),
        ({"settings": {"keep_alive_s": "soon"}}, "must be a number"),
        ({"colour": "blue"}, "unknown keys colour"),
        ({"node_id": 3}, "'node_id' must be a str"),
    ],
)
def test_bad_config_says_what_is_wrong(over, complaint):
    with pytest.raises(ConfigError, match=complaint):
        NodeConfig.from_dict(good(**over))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        NodeConfig.load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("node_id = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        NodeConfig.load(tmp_path / "bad.toml")


def test_cluster_up_set_takes_node_settings_and_refuses_what_node_toml_would():
    from flint.cli import _settings

    assert _settings(["worker_memory_mb=4096", "keep_alive_s = 1.5", "record_executions=true"]) == {
        "worker_memory_mb": 4096, "keep_alive_s": 1.5, "record_executions": True}
    with pytest.raises(ConfigError, match="unknown key 'keep_alive'; known keys are"):
        _settings(["keep_alive=5"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        _settings(["keep_alive_s"])
    with pytest.raises(ConfigError, match="'soon' is not a number"):
        _settings(["keep_alive_s=soon"])
    assert _settings(['sandbox_resolver="10.0.0.2"', 'sandbox_network_refused=["10.0.0.0/8"]']) == {
        "sandbox_resolver": "10.0.0.2", "sandbox_network_refused": ["10.0.0.0/8"]}


def test_the_default_settings_are_valid_together():
    assert Settings().validate() == Settings()


@pytest.mark.parametrize(
    "settings, complaint",
    [
        ({"shutdown_grace_s": 901}, r"shutdown_grace_s = 901: it must be between 0 and 900"),
        ({"credit_lease_s": 0.5}, r"credit_lease_s = 0.5: it must be between 1 and 60"),
        ({"keep_alive_s": -1}, r"keep_alive_s = -1: it must be at least 0.1"),
        ({"orphan_grace_s": 1.0}, r"orphan_grace_s = 1, heartbeat_interval_s = 0.5, missed_heartbeats = 3: a worker "
                                  r"would reap"),
        ({"worker_lease_s": 5, "heartbeat_interval_s": 1.0}, r"a worker lease would end before"),
        ({"sandbox_pool": 8, "max_sandboxes": 4}, r"more prepared slots than sandboxes"),
        ({"unreserved_min": 20, "default_tenant_limit": 10}, r"lower unreserved_min"),
    ],
)
def test_settings_out_of_range_or_out_of_step_are_refused_naming_what_to_change(settings, complaint):
    with pytest.raises(ConfigError, match=complaint):
        NodeConfig.from_dict(good(settings=settings))


def test_sandbox_network_settings_are_read_and_checked():
    s = NodeConfig.from_dict(good(settings={"sandbox_network_refused": ["10.0.0.0/8"], "sandbox_resolver": "10.0.0.2",
                                            "sandbox_network_block": "198.18.7.0/24"})).settings
    assert s.sandbox_network_refused == ("10.0.0.0/8",) and s.sandbox_resolver == "10.0.0.2"
    assert NodeConfig.from_dict(NodeConfig.from_dict(good(settings={"sandbox_network_refused": ["10.0.0.0/8"]}))
                                .to_dict()).settings.sandbox_network_refused == ("10.0.0.0/8",)


@pytest.mark.parametrize(
    "settings, complaint",
    [
        ({"sandbox_network_cidr": "198.18.0.0/33"}, r"sandbox_network_cidr = '198.18.0.0/33': not an IPv4 network"),
        ({"sandbox_network_cidr": 7}, r"sandbox_network_cidr must be a string"),
        ({"sandbox_network_prefix": 12}, r"sandbox_network_prefix = 12: it must be between 16 and 30"),
        ({"sandbox_network_cidr": "198.18.0.0/24", "sandbox_network_prefix": 16}, r"must lie in sandbox_network_cidr"),
        ({"sandbox_network_block": "10.0.0.0/24"}, r"it must be a /24 of sandbox_network_cidr = 198.18.0.0/16"),
        ({"sandbox_network_refused": ["198.18.0.0/15"]}, r"overlaps sandbox_network_cidr"),
        ({"sandbox_network_refused": "10.0.0.0/8"}, r"must be a list of strings"),
        ({"sandbox_resolver": "dns.example"}, r"an IPv4 address"),
    ],
)
def test_sandbox_network_settings_that_cannot_work_are_refused(settings, complaint):
    with pytest.raises(ConfigError, match=complaint):
        NodeConfig.from_dict(good(settings=settings))
