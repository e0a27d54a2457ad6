import os
import stat

import pytest

from tpserve import wire


def test_roundtrip_and_tag():
    codec = wire.Codec(wire.new_key())
    msg = wire.Submit(7, [1, 2, 3], {"max_tokens": 4}, True, 1.5)
    assert codec.decode(codec.encode(msg)) == msg
    assert codec.dropped == 0


def test_tampered_or_foreign_frames_are_dropped_and_counted():
    key = wire.new_key()
    codec = wire.Codec(key)
    tag, payload = codec.encode(wire.Abort(3))
    assert codec.decode([tag, payload.replace(b"\x03", b"\x04")]) is None  # payload changed
    assert codec.decode(wire.Codec(wire.new_key()).encode(wire.Abort(3))) is None  # other key
    assert codec.decode([b"x"]) is None  # wrong frame count
    junk = b"\x93\x01\x02"
    import hashlib
    import hmac

    assert codec.decode([hmac.new(key, junk, hashlib.sha256).digest(), junk]) is None  # signed garbage
    unknown = wire.msgpack.packb(["nope", {}])
    assert codec.decode([hmac.new(key, unknown, hashlib.sha256).digest(), unknown]) is None
    assert codec.dropped == 5


def test_no_pickle_on_the_wire():
    payload = wire.pack(wire.Outputs([{"request_id": 1, "token_ids": [1]}]))
    assert b"pickle" not in payload and not payload.startswith(b"\x80")


def test_items_roundtrip():
    items = [wire.Submit(1, [5]), wire.Abort(1), wire.Shutdown(drain=True)]
    assert wire.unpack_items(wire.pack_items(items)) == items


def test_connection_file_is_private(tmp_path):
    info = wire.ConnectionInfo("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", wire.new_key())
    path = str(tmp_path / "conn.json")
    info.write(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert wire.ConnectionInfo.read(path) == info
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="malformed"):
        wire.ConnectionInfo.read(str(tmp_path / "bad.json"))
