"""
Protobuf (de)serialization of relay messages that keeps large bodies out of
the protobuf runtime.

A message is a header of a few hundred bytes around a body of up to a
megabyte (or more). With upb (CPython) protobuf copies that body once each
way; with the pure-Python runtime (all PyPy has) parsing and serializing a
megabyte C{HttpResponse} costs more than the rest of relaying it. So the
body field is cut out of the wire bytes (or spliced into them) here, and
protobuf only sees the small rest. The bytes produced are exactly those of
C{SerializeToString()} (fields in number order, as Go writes them too), and
anything unusual (groups, a truncated field, a body that is not
length-delimited) falls back to protobuf itself, whose errors are the ones callers
report.
"""

from typing import List, Optional, Tuple

from google.protobuf.message import DecodeError

# Below this, protobuf handles the whole message faster than we could split it.
SPLIT_THRESHOLD = 16 * 1024

_LENGTH_DELIMITED = 2


def _varint(data: bytes, pos: int, end: int) -> Tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_at(data: bytes, pos: int, end: int) -> Tuple[int, int, int]:
    """
    (field number, wire type, end) of the field starting at C{pos}; its end
    may lie beyond C{end} (a truncated field, or one the caller has only the
    start of). DecodeError for anything this scanner does not handle.
    """
    tag, pos = _varint(data, pos, end)
    number, wire_type = tag >> 3, tag & 7
    if number == 0:
        raise DecodeError("field number 0")
    if wire_type == 0:
        _, pos = _varint(data, pos, end)
    elif wire_type == 1:
        pos += 8
    elif wire_type == 2:
        length, pos = _varint(data, pos, end)
        pos += length
    elif wire_type == 5:
        pos += 4
    else:
        raise DecodeError("groups are left to protobuf")
    return number, wire_type, pos


def _value_start(data: bytes, start: int, end: int) -> int:
    """Where the value of the length-delimited field at C{start} begins (after its key and length)."""
    _, pos = _varint(data, start, end)
    _, pos = _varint(data, pos, end)
    return pos


def _fields(data: bytes) -> List[Tuple[int, int, int, int]]:
    """
    (field number, wire type, start, end) of each top-level field, or
    DecodeError for anything this scanner does not handle.
    """
    fields = []
    pos = 0
    end = len(data)
    while pos < end:
        start = pos
        number, wire_type, pos = _field_at(data, pos, end)
        if pos > end:
            raise DecodeError("truncated field")
        fields.append((number, wire_type, start, pos))
    return fields


def serialize(message, body_field: str, body: Optional[List[bytes]] = None) -> List[bytes]:
    """
    C{message.SerializeToString()} as a list of pieces whose concatenation
    is exactly that, with the body field's value as a piece of its own (not
    copied). C{body}, if given, is the body as pieces, for a message whose
    body field is unset: the bytes are those of the message with the pieces
    joined into that field (nothing when they are empty).
    """
    if body is None:
        if not message.HasField(body_field):
            return [message.SerializeToString()]
        value = getattr(message, body_field)
        if len(value) < SPLIT_THRESHOLD:
            return [message.SerializeToString()]
        message.ClearField(body_field)
        try:
            rest = message.SerializeToString()
        finally:
            setattr(message, body_field, value)
        body = [value]
        size = len(value)
    else:
        size = sum(map(len, body))
        if not size:
            return [message.SerializeToString()]
        rest = message.SerializeToString()
    number = message.DESCRIPTOR.fields_by_name[body_field].number
    # The body goes before the first field with a higher number.
    split = len(rest)
    for field_number, _, start, _ in _fields(rest):
        if field_number > number:
            split = start
            break
    key = encode_varint((number << 3) | _LENGTH_DELIMITED) + encode_varint(size)
    pieces = [rest[:split], key]
    pieces.extend(body)
    pieces.append(rest[split:])
    return [piece for piece in pieces if piece]


def parse(message, data: bytes, body_field: str) -> None:
    """
    C{message.ParseFromString(data)}, with the body field sliced out of
    C{data} directly. Raises what protobuf raises for invalid data.
    """
    if len(data) < SPLIT_THRESHOLD:
        message.ParseFromString(data)
        return
    number = message.DESCRIPTOR.fields_by_name[body_field].number
    try:
        fields = _fields(data)
    except DecodeError:
        message.ParseFromString(data)  # raises the error protobuf reports
        return
    body: Optional[Tuple[int, int]] = None
    rest = []
    for field_number, wire_type, start, end in fields:
        if field_number == number:
            if wire_type != _LENGTH_DELIMITED:
                message.ParseFromString(data)
                return
            body = (start, end)  # the last one wins, as in protobuf
        else:
            rest.append(data[start:end])
    if body is None:
        message.ParseFromString(data)
        return
    message.ParseFromString(b"".join(rest))
    start, end = body
    setattr(message, body_field, data[_value_start(data, start, end):end])


def _span(pieces: List[bytes], start: int, end: int) -> List[bytes]:
    """The bytes [start, end) of the concatenation of C{pieces}, as pieces (slicing only the two ends)."""
    out = []
    offset = 0
    for piece in pieces:
        size = len(piece)
        if offset + size > start and offset < end:
            lo = max(start - offset, 0)
            hi = min(end - offset, size)
            out.append(piece if lo == 0 and hi == size else piece[lo:hi])
        offset += size
        if offset >= end:
            break
    return out


def parse_pieces(message, pieces: List[bytes], body_field: str) -> Optional[List[bytes]]:
    """
    L{parse} for a message that arrived as C{pieces} (the reads of a request
    body), without joining them: returns the body as pieces of its own, and
    leaves the body field unset; or None when the body (if any) was parsed
    into the message as usual. Raises what protobuf raises for invalid data.
    """
    total = sum(map(len, pieces))
    if total < SPLIT_THRESHOLD or len(pieces) < 2:
        parse(message, b"".join(pieces), body_field)
        return None
    number = message.DESCRIPTOR.fields_by_name[body_field].number
    head = pieces[0]
    index = 1
    while len(head) < 8192 and index < len(pieces):
        head += pieces[index]
        index += 1
    # Walk the fields in the head up to the body's key and length.
    pos = 0
    try:
        while True:
            start = pos
            field_number, wire_type, pos = _field_at(head, pos, len(head))
            if field_number == number:
                if wire_type != _LENGTH_DELIMITED:
                    raise DecodeError("left to protobuf")
                break
            if pos >= len(head):
                raise DecodeError("the body does not start in the head")
        end = pos
        value_start = _value_start(head, start, len(head))
        if end > total:
            raise DecodeError("truncated body")
        tail = b"".join(_span(pieces, end, total))
        if any(field == number for field, _, _, _ in _fields(tail)):
            raise DecodeError("a second body is left to protobuf")
    except DecodeError:
        parse(message, b"".join(pieces), body_field)
        return None
    message.ParseFromString(head[:start] + tail)
    return _span(pieces, value_start, end)
