import subprocess
import sys

from conftest import ROOT


def test_generated_stubs_are_fresh():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_array_roundtrip_and_rejections():
    import numpy as np
    import pytest
    from llamarpc.proto import pb
    from llamarpc.proto.arrays import array_from_pb, array_to_pb
    from llamarpc.proto.errors import InvalidArgument

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(array_from_pb(array_to_pb(a)), a)
    i = np.arange(5, dtype=np.int32)
    assert np.array_equal(array_from_pb(array_to_pb(i)), i)
    with pytest.raises(InvalidArgument, match="needs 48 bytes"):
        array_from_pb(pb.Array(type=0, shape=[3, 4], data=b"\0" * 47))
    with pytest.raises(InvalidArgument, match="unknown type id"):
        array_from_pb(pb.Array(type=999, shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match="bad shape"):
        array_from_pb(pb.Array(type=0, shape=[-1], data=b""))
    with pytest.raises(InvalidArgument, match="not an activation type"):
        array_from_pb(pb.Array(type=2, shape=[32], data=b"\0" * 18))
