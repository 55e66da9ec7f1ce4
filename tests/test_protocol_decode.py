"""Property: every protocol message type, decoded from frames with valid-but-wrong shapes, dtypes
and ranges, either yields a valid message or raises ValueError, never anything else."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import msgspec
import msgspec.inspect as mi
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.protocol import EngineMessage, EngineToWorker, FrontendMessage, WorkerToEngine
from shared.transport import Codec

UNIONS = {"frontend": FrontendMessage, "engine": EngineMessage, "worker": WorkerToEngine, "plan": EngineToWorker}


def forged(tag: str, *fields) -> list[bytes]:
    """The frames of a hand-built message: any field may be a numpy array, sent in a frame of its
    own with its real dtype and shape (0-d too), whatever the protocol expects there."""
    frames = [b""]

    def as_ext(value):
        if not isinstance(value, np.ndarray):
            raise NotImplementedError(type(value))
        frames.append(value.tobytes())
        return msgspec.msgpack.Ext(1, msgspec.msgpack.encode((value.dtype.str, list(value.shape), len(frames) - 1)))

    frames[0] = msgspec.msgpack.Encoder(enc_hook=as_ext).encode([tag, *fields])
    return frames


# Every integer msgpack can carry, with the edges of the ranges the protocol uses.
INTS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([-1, 0, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
ARRAYS = hnp.arrays(
    st.sampled_from([np.int32, np.int64, np.int16, np.uint32, np.float32, np.float64, np.bool_, ">i4"]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
TOKEN_IDS = hnp.arrays(np.int32, st.integers(0, 5), elements=st.integers(0, 1000))  # valid ones
STRINGS = st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(["", "x" * 257]))
ANYTHING = st.one_of(st.none(), st.booleans(), INTS, st.floats(), STRINGS, ARRAYS, st.lists(INTS, max_size=3))


def _shaped(t: mi.Type) -> st.SearchStrategy:
    """Values shaped like type t, ranges ignored (so some are out of range)."""
    if isinstance(t, mi.IntType):
        return INTS
    if isinstance(t, mi.FloatType):
        return st.floats()
    if isinstance(t, mi.StrType):
        return STRINGS
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.CustomType):  # token id arrays
        return st.one_of(TOKEN_IDS, ARRAYS)
    if isinstance(t, (mi.ListType, mi.SetType)):
        return st.lists(_shaped(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(_shaped(t.key_type), _shaped(t.value_type), max_size=3)
    if isinstance(t, mi.UnionType):  # None first: an optional field's simplest draw is absent
        return st.one_of([_shaped(u) for u in sorted(t.types, key=lambda u: not isinstance(u, mi.NoneType))])
    if isinstance(t, mi.StructType):
        return struct_values(t)
    return ANYTHING


def struct_values(t: mi.StructType) -> st.SearchStrategy:
    """A struct's fields shaped by their types, at most one of them replaced by anything at all:
    an array-like struct as [tag?, fields...] (trailing fields sometimes left out), any other
    struct (SamplingParams) as a map of some of its fields."""
    n = len(t.fields)
    # (index of the field replaced, or -1 for none, as often as not (and for hypothesis's favourite
    # draw, 0); its value)
    junk = st.tuples(st.integers(0, 2 * n).map(lambda i: i - 1 if 1 <= i <= n else -1), ANYTHING)
    if not t.array_like:
        names = [f.encode_name for f in t.fields]
        some = st.fixed_dictionaries({}, optional={f.encode_name: _shaped(f.type) for f in t.fields})
        return st.tuples(some, junk).map(lambda v: v[0] if v[1][0] < 0 else {**v[0], names[v[1][0]]: v[1][1]})
    head = [t.tag] if t.tag is not None else []
    fields = st.tuples(*[_shaped(f.type) for f in t.fields]).map(list)
    kept = st.integers(0, 2 * n).map(lambda k: k - 1 if 1 <= k <= n else n)  # all fields half the time

    def build(v: tuple) -> list:
        values, (index, value), k = v
        if index >= 0:
            values[index] = value
        return head + values[:k]

    return st.tuples(fields, junk, kept).map(build)


def message_frames(union) -> st.SearchStrategy:
    """Frames of any message of a tagged union, built field by field from its types."""
    members = mi.type_info(union).types
    return st.one_of([struct_values(m) for m in members]).map(lambda v: forged(*v))


def check_valid(msg) -> None:
    """What service code relies on in a decoded message: token ids as 1-D non-negative int32
    arrays, and a message that encodes and decodes again unchanged in kind."""
    for name in msg.__struct_fields__:
        value = getattr(msg, name)
        if isinstance(value, np.ndarray):
            assert value.ndim == 1 and value.dtype == np.int32 and (value.size == 0 or value.min() >= 0)


@pytest.mark.parametrize("union", list(UNIONS), ids=list(UNIONS))
def test_decoding_any_message_yields_a_valid_one_or_value_error(union):
    codec = Codec(UNIONS[union])

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(frames=message_frames(UNIONS[union]))
    def decode(frames: list[bytes]) -> None:
        try:
            msg = codec.decode(frames)
        except ValueError:
            return
        check_valid(msg)
        assert type(codec.decode(codec.encode(msg))) is type(msg)

    decode()


def test_the_strategies_reach_valid_messages_too():
    """Not only errors: some generated frames decode, so the property covers accepted messages."""
    codec, decoded = Codec(FrontendMessage), []

    @settings(max_examples=300, deadline=None)
    @given(frames=message_frames(FrontendMessage))
    def collect(frames: list[bytes]) -> None:
        try:
            decoded.append(type(codec.decode(frames)).__name__)
        except ValueError:
            pass

    collect()
    assert {"AddRequest", "Ping", "Hello"} <= set(decoded)
