"""Small immutable message types, validated on decode, both ways.

A message type is a frozen dataclass whose fields are declared with `text()`, `integer()`, `flag()`, ... Each
declaration carries its own bounds, so `Message.from_wire()` refuses a malformed message in one place, naming
the field: a missing field or a wrong type is `InvalidRequestContentException`; a value out of its range, too
long or not among the choices is `InvalidParameterValueException` (as Lambda says of a memory size of 64 MB).

A request type names its reply type (`@message("op", reply=SomeReply)`): a server's handler returns an instance
of it and the client gets one back, validated the same way. A field declared with `raw()` is the message's one
raw frame (an invoke payload, a code zip): it travels after the header and is never parsed by msgpack.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any, ClassVar, TypeVar

from wire.errors import (
    InvalidParameterValueException,
    InvalidRequestContentException,
    RequestTooLargeException,
)

_REQUIRED = dataclasses.MISSING
M = TypeVar("M", bound="Message")


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    kind: str  # str | int | float | bool | bytes | raw | str_list | str_map | int_map | map | nested | nested_list
    #            | nested_map
    max_len: int | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    nested: type[Message] | None = None
    optional: bool = False
    enum_cls: type[enum.Enum] | None = None  # choices given as an enum: decoded values become its members
    pattern: re.Pattern | None = None  # a text must match it whole
    pattern_says: str = ""  # the pattern, as a tenant reads it in an error

    def check(self, name: str, value: Any) -> Any:
        if value is None:
            if self.optional:
                return None
            raise InvalidRequestContentException(f"field '{name}' is required")
        kind = self.kind
        if kind == "str":
            if not isinstance(value, str):
                raise _wrong(name, "a string", value)
            if self.max_len is not None and len(value) > self.max_len:
                raise InvalidParameterValueException(f"field '{name}' is longer than {self.max_len} characters")
            if self.choices is not None and value not in self.choices:
                raise InvalidParameterValueException(f"field '{name}' must be one of {', '.join(self.choices)}")
            if self.pattern is not None and self.pattern.fullmatch(value) is None:
                raise InvalidParameterValueException(f"field '{name}' value {value[:80]!r} is not allowed: "
                                                     f"{self.pattern_says}")
            return value if self.enum_cls is None else self.enum_cls(value)
        if kind == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise _wrong(name, "an integer", value)
            self._range(name, value)
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _wrong(name, "a finite number", value)
            self._range(name, value)
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise _wrong(name, "true or false", value)
            return value
        if kind == "bytes" or kind == "raw":
            if not isinstance(value, bytes):
                raise _wrong(name, "bytes", value)
            if self.max_len is not None and len(value) > self.max_len:
                raise InvalidRequestContentException(f"field '{name}' is longer than {self.max_len} bytes")
            return value
        if kind == "str_list":
            if not isinstance(value, (list, tuple)):
                raise _wrong(name, "a list of strings", value)
            if self.max_len is not None and len(value) > self.max_len:
                raise InvalidRequestContentException(f"field '{name}' has more than {self.max_len} items")
            if not all(isinstance(v, str) and len(v) <= 4096 for v in value):
                raise _wrong(name, "a list of strings", value)
            return tuple(value)
        if kind == "str_map":
            if not isinstance(value, dict):
                raise _wrong(name, "a map of strings", value)
            if self.max_len is not None and len(value) > self.max_len:
                raise InvalidRequestContentException(f"field '{name}' has more than {self.max_len} entries")
            for k, v in value.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise _wrong(name, "a map of strings to strings", value)
            return dict(value)
        if kind == "int_map":
            if not isinstance(value, dict):
                raise _wrong(name, "a map of integers", value)
            if self.max_len is not None and len(value) > self.max_len:
                raise InvalidRequestContentException(f"field '{name}' has more than {self.max_len} entries")
            for k, v in value.items():
                if not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool):
                    raise _wrong(name, "a map of strings to integers", value)
            return dict(value)
        if kind == "nested_map":
            assert self.nested is not None
            if not isinstance(value, dict):
                raise _wrong(name, "a map of maps", value)
            if self.max_len is not None and len(value) > self.max_len:
                raise InvalidRequestContentException(f"field '{name}' has more than {self.max_len} entries")
            out_map = {}
            for k, item in value.items():
                if not isinstance(k, str) or not isinstance(item, dict):
                    raise _wrong(name, "a map of strings to maps", value)
                out_map[k] = self.nested.from_fields(item, prefix=f"{name}[{k!r:.40}].")
            return out_map
        if kind == "map":
            if not isinstance(value, dict):
                raise _wrong(name, "a map", value)
            return value
        if kind == "nested":
            assert self.nested is not None
            if not isinstance(value, dict):
                raise _wrong(name, "a map", value)
            return self.nested.from_fields(value, prefix=f"{name}.")
        if kind == "nested_list":
            assert self.nested is not None
            if not isinstance(value, (list, tuple)):
                raise _wrong(name, "a list of maps", value)
            if self.max_len is not None and len(value) > self.max_len:
                raise InvalidRequestContentException(f"field '{name}' has more than {self.max_len} items")
            out = []
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise _wrong(f"{name}[{i}]", "a map", item)
                out.append(self.nested.from_fields(item, prefix=f"{name}[{i}]."))
            return tuple(out)
        raise AssertionError(f"unknown field kind {kind}")

    def _range(self, name: str, value: float) -> None:
        if self.min is not None and value < self.min:
            raise InvalidParameterValueException(f"field '{name}' must be at least {self.min:g}")
        if self.max is not None and value > self.max:
            raise InvalidParameterValueException(f"field '{name}' must be at most {self.max:g}")


def _wrong(name: str, expected: str, value: Any) -> InvalidRequestContentException:
    return InvalidRequestContentException(f"field '{name}' must be {expected}, got {type(value).__name__}")


def _field(spec: Spec, default: Any) -> Any:
    if default is _REQUIRED:
        return dataclasses.field(metadata={"spec": spec})
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"spec": spec})
    return dataclasses.field(default=default, metadata={"spec": spec})


def text(max_len: int = 256, *, default: Any = _REQUIRED,
         choices: tuple[str, ...] | type[enum.StrEnum] | None = None, pattern: str | None = None,
         pattern_says: str = "") -> Any:
    """A string of at most `max_len` characters; with `choices`, one of them; with `pattern`, matching it whole
    (`pattern_says` explains it to whoever sent something else)."""
    enum_cls = choices if isinstance(choices, type) and issubclass(choices, enum.Enum) else None
    values = tuple(str(c.value) for c in enum_cls) if enum_cls is not None else choices
    compiled = re.compile(pattern) if pattern is not None else None
    return _field(Spec("str", max_len=max_len, choices=values, optional=default is None, enum_cls=enum_cls,
                       pattern=compiled, pattern_says=pattern_says or f"it must match {pattern}"), default)


def integer(min: int | None = None, max: int | None = None, *, default: Any = _REQUIRED) -> Any:
    return _field(Spec("int", min=min, max=max, optional=default is None), default)


def number(min: float | None = None, max: float | None = None, *, default: Any = _REQUIRED) -> Any:
    return _field(Spec("float", min=min, max=max, optional=default is None), default)


def flag(*, default: Any = _REQUIRED) -> Any:
    return _field(Spec("bool", optional=default is None), default)


def blob(max_len: int, *, default: Any = _REQUIRED) -> Any:
    return _field(Spec("bytes", max_len=max_len, optional=default is None), default)


def raw(max_len: int, *, default: Any = _REQUIRED) -> Any:
    """The message's raw frame (at most one per type): sent after the header, never inside it."""
    return _field(Spec("raw", max_len=max_len, optional=default is None), default)


def int_map(max_items: int = 100_000, *, default: Any = _REQUIRED) -> Any:
    return _field(Spec("int_map", max_len=max_items, optional=default is None), default)


def nested_map(cls: type[Message], max_items: int = 100_000, *, default: Any = _REQUIRED) -> Any:
    return _field(Spec("nested_map", nested=cls, max_len=max_items, optional=default is None), default)


def text_list(max_items: int = 64, *, default: Any = _REQUIRED) -> Any:
    if isinstance(default, list):
        default = tuple(default)
    return _field(Spec("str_list", max_len=max_items, optional=default is None), default)


def text_map(max_items: int = 256, *, default: Any = _REQUIRED) -> Any:
    return _field(Spec("str_map", max_len=max_items, optional=default is None), default)


def any_map(*, default: Any = _REQUIRED) -> Any:
    return _field(Spec("map", optional=default is None), default)


def nested(cls: type[Message], *, default: Any = _REQUIRED) -> Any:
    return _field(Spec("nested", nested=cls, optional=default is None), default)


def nested_list(cls: type[Message], max_items: int = 100_000, *, default: Any = _REQUIRED) -> Any:
    if isinstance(default, list):
        default = tuple(default)
    return _field(Spec("nested_list", nested=cls, max_len=max_items, optional=default is None), default)


class Message:
    """Base of every message type. Subclasses are frozen dataclasses (use the `@message` decorator)."""

    op: ClassVar[str] = ""
    reply: ClassVar[type[Message] | None] = None  # what a server answers a request of this type with
    max_payload_bytes: ClassVar[int] = 0  # the raw frame's limit (0: the type carries none)
    _raw: ClassVar[str | None] = None  # the name of the field that is the raw frame
    _specs: ClassVar[tuple[tuple[str, Spec, bool], ...]] = ()  # (name, spec, required), in declaration order
    __slots__ = ()

    @classmethod
    def from_fields(cls: type[M], fields: dict[str, Any], *, prefix: str = "", raw: bytes | None = None) -> M:
        values = {}
        for name, spec, required in cls._specs:
            if name == cls._raw:
                if raw is not None:
                    values[name] = raw
            elif name in fields:
                values[name] = spec.check(prefix + name, fields[name])
            elif required:
                raise InvalidRequestContentException(f"field '{prefix}{name}' is required")
        return cls(**values)

    @classmethod
    def from_wire(cls: type[M], header: dict[str, Any], payload: bytes | None) -> M:
        """A message from its header map and raw frame. A raw frame the type does not carry, or one over its
        limit, is refused before any field is read."""
        if payload is not None and len(payload) > cls.max_payload_bytes:
            raise RequestTooLargeException(f"payload of {len(payload)} bytes exceeds the "
                                           f"{cls.max_payload_bytes}-byte limit of {cls.op or cls.__name__}")
        return cls.from_fields(header, raw=payload)

    def checked(self: M) -> M:
        """This message, once each field passed the check its receiver will make, or the error that receiver
        would raise: for a message built from what an untrusted party said (a sandbox's reply), before it is
        sent."""
        for name, spec, _ in self._specs:
            spec.check(name, _plain(getattr(self, name)))
        return self

    def to_fields(self) -> dict[str, Any]:
        """The header fields (the raw frame is not among them)."""
        out: dict[str, Any] = {}
        for name, _, _ in self._specs:
            value = getattr(self, name)
            if value is None or name == self._raw:
                continue
            out[name] = _plain(value)
        return out

    @property
    def raw_frame(self) -> bytes | None:
        return None if self._raw is None else getattr(self, self._raw)

    def replace(self: M, **changes: Any) -> M:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_fields()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


OPS: dict[str, type[Message]] = {}


def message(op: str | None = None, *, reply: type[Message] | None = None):
    """Declare a message type. With `op`, it is a request that servers can dispatch on, answered by `reply`."""

    def wrap(cls: type[M]) -> type[M]:
        cls = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
        specs = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            spec: Spec = f.metadata["spec"]
            required = f.default is _REQUIRED and f.default_factory is _REQUIRED  # type: ignore[misc]
            specs.append((f.name, spec, required))
            if spec.kind == "raw":
                if cls._raw is not None and cls._raw != f.name:
                    raise AssertionError(f"{cls.__name__} declares two raw frames")
                cls._raw, cls.max_payload_bytes = f.name, spec.max_len or 0
        cls._specs = tuple(specs)
        if op is not None:
            if op in OPS:
                raise AssertionError(f"op {op!r} declared twice")
            if reply is None:
                raise AssertionError(f"op {op!r} declares no reply type")
            cls.op = op
            cls.reply = reply
            OPS[op] = cls
        return cls

    return wrap
