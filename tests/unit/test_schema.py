"""Message types refuse malformed fields in one place, naming the field."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import messages as m
from wire.errors import FlintError, InvalidParameterValueException, InvalidRequestContentException
from wire.schema import OPS, Message, message, text


def config_fields(**over):
    base = dict(tenant="t", name="f", handler="h.fn", code_sha256="a" * 64)
    base.update(over)
    return base


def test_valid_message_round_trips():
    msg = m.Invoke(function="hello", log_tail=True)
    assert m.Invoke.from_fields(msg.to_fields()) == msg


def test_nested_message_round_trips():
    msg = m.Reserve(config=m.FunctionConfig.from_fields(config_fields()), request_id="r1", avoid_nodes=("n1",))
    again = m.Reserve.from_fields(msg.to_fields())
    assert again == msg
    assert again.config.memory_mb == 128


@pytest.mark.parametrize(
    "fields, error, complaint",
    [
        ({}, InvalidRequestContentException, "'function' is required"),
        ({"function": 7}, InvalidRequestContentException, "'function' must be a string"),
        ({"function": "x" * 65}, InvalidParameterValueException, "longer than 64"),
        ({"function": "f", "invocation_type": "Sometimes"}, InvalidParameterValueException, "must be one of"),
        ({"function": "f", "log_tail": "yes"}, InvalidRequestContentException, "'log_tail' must be true or false"),
    ],
)
def test_bad_fields_are_refused_with_the_field_named(fields, error, complaint):
    with pytest.raises(error, match=complaint):
        m.Invoke.from_fields(fields)


def test_numbers_are_range_checked():
    with pytest.raises(InvalidParameterValueException, match="memory_mb' must be at most 10240"):
        m.FunctionConfig.from_fields(config_fields(memory_mb=20000))
    with pytest.raises(InvalidRequestContentException, match="must be an integer"):
        m.FunctionConfig.from_fields(config_fields(memory_mb=True))
    with pytest.raises(InvalidRequestContentException, match="finite number"):
        m.FunctionConfig.from_fields(config_fields(timeout_s=float("nan")))


def test_nested_errors_name_the_path():
    with pytest.raises(InvalidRequestContentException, match="'config.handler' is required"):
        m.Reserve.from_fields({"config": {"tenant": "t", "name": "f", "code_sha256": "a" * 64}, "request_id": "r"})


def test_declaring_an_op_twice_is_refused():
    with pytest.raises(AssertionError, match="op 'invoke' declared twice"):
        @message("invoke")
        class AnotherInvoke(Message):
            function: str = text(max_len=64)
    assert OPS["invoke"] is m.Invoke


# who answers an op: the prefix names the service (or the node daemon's admin endpoint, or the frontend's tenant
# administration); an op without one is a tenant's, named as in Lambda's API
SERVICES = {"registry", "counting", "placement", "manager", "worker", "node", "tenant"}


def test_every_op_in_the_message_module_is_its_own_once_with_a_service_prefix_or_tenant_name():
    # collected from the module itself, not from the registry: a subclass that inherits its parent's op, or a
    # class whose name another one shadows, shows up here and nowhere else
    requests = {obj for obj in vars(m).values()
                if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message and obj.op}
    ops = sorted(cls.op for cls in requests)
    assert [op for op in ops if ops.count(op) > 1] == [], "two message types answer to one op"
    assert {cls.op: cls for cls in requests} == OPS, "the registry and the message module disagree"
    for op in ops:
        service, _, name = op.rpartition(".")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", name), f"{op!r}: not a snake_case name"
        assert service == "" or service in SERVICES, f"{op!r}: {service!r} is no service"


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.integers(), st.text(), st.booleans(),
                                                        st.lists(st.integers()), st.binary())))
def test_arbitrary_field_maps_never_raise_anything_but_named_errors(fields):
    for cls in OPS.values():
        try:
            cls.from_fields(fields)
        except (InvalidRequestContentException, InvalidParameterValueException):
            pass
        except FlintError as err:  # pragma: no cover - would be a bug
            raise AssertionError(f"{cls.op}: unexpected {err}") from err
