"""How a message travels: a msgpack map {"v": PROTOCOL_VERSION, "type": <class name>, "body": {field: value}}
holding only msgpack's own types (no pickle, no extension types).

`decode` checks the size, version, type name and every field's type before building the object,
and raises ProtocolError otherwise. A tensor field (a draft's distributions) travels as
{"shape": [...], "float32": <bytes>}: this module is the one place tensors become bytes and back.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import msgpack
import torch

from workers.protocol import limits
from workers.protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Sampling, Span


class ProtocolError(ValueError):
    """A message that is malformed, too large, of an unknown type or of another protocol version."""


def _to_wire(value: object) -> object:
    if isinstance(value, torch.Tensor):
        array = value.detach().to("cpu", torch.float32).contiguous()
        return {"shape": list(array.shape), "float32": array.numpy().tobytes()}
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return [_to_wire(item) for item in value]
    return value


def encode(message: object) -> bytes:
    name = type(message).__name__
    if MESSAGE_TYPES.get(name) is not type(message):
        raise TypeError(f"{name} is not a protocol message")
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": name, "body": _to_wire(message)}, use_bin_type=True)


def decode(data: bytes) -> object:
    if len(data) > limits.MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {limits.MAX_MESSAGE_BYTES}-byte limit")
    # every length bounded explicitly (msgpack's own defaults follow max_buffer_size: 64 M list items)
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, use_list=True, max_buffer_size=limits.MAX_MESSAGE_BYTES,
        max_str_len=limits.MAX_MESSAGE_BYTES, max_bin_len=limits.MAX_MESSAGE_BYTES, max_array_len=limits.MAX_ARRAY_LEN,
        max_map_len=limits.MAX_MAP_LEN, ext_hook=_refuse_extension
    )
    try:
        unpacker.feed(data)
        envelope = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise ProtocolError(f"{len(data) - unpacker.tell()} stray bytes after the message")
    except ProtocolError:
        raise
    except Exception as error:  # msgpack raises several types for truncated or garbage input
        raise ProtocolError(f"not a msgpack message: {type(error).__name__}: {error}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"v", "type", "body"}:
        raise ProtocolError("message must be a map with exactly the keys v, type and body")
    if envelope["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {_clip(envelope['v'])} is not {PROTOCOL_VERSION} (mixed specpipe versions?)"
        )
    cls = MESSAGE_TYPES.get(envelope["type"]) if isinstance(envelope["type"], str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_clip(envelope['type'])}")
    return _build(cls, envelope["body"], envelope["type"])


def _clip(value: object, limit: int = 80) -> str:
    """repr of a value from the wire, cut short: an error message must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refuse_extension(code: int, data: bytes) -> object:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _build(cls: type, body: object, where: str) -> object:
    return _VALIDATORS[cls](body, where)


def _compile(cls: type):
    """A function that checks a decoded map against `cls`'s fields and builds it (made once per class)."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _checker(hints[f.name]),
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
              for f in dataclasses.fields(cls)]
    names = {name for name, _, _ in fields}

    def build(body: object, where: str) -> object:
        if not isinstance(body, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(body).__name__}")
        if not body.keys() <= names:
            raise ProtocolError(f"{where}: unknown field(s) {_clip(sorted(map(str, body.keys() - names)))}")
        values = {}
        for name, check, required in fields:
            if name in body:
                values[name] = check(body[name], f"{where}.{name}")
            elif required:
                raise ProtocolError(f"{where}: missing field {name!r}")
        return cls(**values)

    return build


def _checker(expected: object):
    """A function (value, where) -> value that raises ProtocolError unless value has type `expected`."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [option for option in typing.get_args(expected) if option is not type(None)]
        check_inner = _checker(inner)
        return lambda value, where: None if value is None else check_inner(value, where)
    if origin is list:
        (item,) = typing.get_args(expected)
        if item is int:  # token lists: the hot path, checked in one pass
            def check_ints(value, where):
                if not isinstance(value, list) or not all(type(v) is int for v in value):
                    raise ProtocolError(f"{where}: expected a list of int")
                return value

            return check_ints
        check_item = _checker(item)

        def check_list(value, where):
            if not isinstance(value, list):
                raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
            return [check_item(element, f"{where}[]") for element in value]

        return check_list
    if dataclasses.is_dataclass(expected):
        return lambda value, where: _VALIDATORS[expected](value, where)
    if expected is torch.Tensor:
        return _check_tensor

    def check_scalar(value, where):
        if expected is float and type(value) is int:
            return float(value)
        if type(value) is not expected:  # exact: bool is not an int here
            raise ProtocolError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
        return value

    return check_scalar




def _check_tensor(value: object, where: str) -> torch.Tensor:
    """A float32 tensor from {"shape": [...], "float32": bytes}; the bytes must fill the shape exactly."""
    if not isinstance(value, dict) or set(value) != {"shape", "float32"}:
        raise ProtocolError(f"{where}: expected a tensor map with exactly the keys shape and float32")
    shape, data = value["shape"], value["float32"]
    # every dimension bounded before anything is allocated: [0, 2**64 - 1] holds no bytes, and torch cannot make it
    if (not isinstance(shape, list) or not 1 <= len(shape) <= limits.MAX_TENSOR_DIMS
            or not all(type(n) is int and 0 <= n <= limits.MAX_TENSOR_DIM for n in shape)):
        raise ProtocolError(f"{where}: shape must be 1 to {limits.MAX_TENSOR_DIMS} ints from 0 to "
                            f"{limits.MAX_TENSOR_DIM}, got {_clip(shape)}")
    if type(data) is not bytes or len(data) != 4 * math.prod(shape):
        raise ProtocolError(f"{where}: a float32 tensor of shape {shape} needs {4 * math.prod(shape)} bytes, got "
                            f"{len(data) if isinstance(data, bytes) else type(data).__name__}")
    return torch.frombuffer(bytearray(data), dtype=torch.float32).view(shape) if data else torch.zeros(shape)


_VALIDATORS = {cls: _compile(cls) for cls in (*MESSAGE_TYPES.values(), Sampling, Span)}
