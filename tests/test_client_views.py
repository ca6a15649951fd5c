"""Lease views: zero-copy, bit-exact, made once per slot, read-only, and alive as long as they are used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from client_fake_daemon import FakeDaemon

from expertd.client import ExpertClient
from expertd.client.views import SlabViews
from expertd.daemon.protocol import ProtocolError, parse_layout
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("views") / "store"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=2)  # 8 experts of 84 KiB per layer
    return path


@pytest.fixture
def served(tmp_path: Path, store: Path):
    address = f"ipc://{tmp_path}/expertd.sock"
    with FakeDaemon(address, str(store), slots=4) as fake, ExpertClient(address, timeout_s=2.0) as client:
        yield fake, client


def test_views_are_the_store_weights_bit_for_bit(served, store: Path) -> None:
    fake, client = served
    with StoreReader(store) as reader, client.acquire(1, [6, 2]) as lease:
        for expert in (6, 2):
            want = reader.read_expert_tensors(1, expert)
            got = lease[expert]
            assert list(got) == ["w1", "w3", "w2"]
            for name, tensor in got.items():
                assert tensor.dtype == want[name].dtype and tensor.shape == want[name].shape
                assert torch.equal(tensor.view(torch.int16), want[name].view(torch.int16))


def test_views_are_zero_copy_views_of_the_slab(served) -> None:
    fake, client = served
    with client.acquire(0, [3]) as lease:
        w1 = lease[3]["w1"]
        slot = fake.slot_of(0, 3)
        assert w1.data_ptr() != fake.slab.slot(slot).ctypes.data  # the client's own mapping...
        fake.slab.slot(slot)[:2] = [0x80, 0x3F]  # ...of the same memory: bf16 1.0 at w1[0, 0]
        assert w1[0, 0].item() == 1.0


def test_views_are_made_once_per_slot(served) -> None:
    fake, client = served
    with client.acquire(0, [5]) as first:
        views = first[5]
    with client.acquire(1, [5, 4]) as other:
        assert other.slots[0] != first.slots[0]
    with client.acquire(0, [5]) as second:  # a hit: the same slot, the same tensor objects
        assert second.slots == first.slots and second.hits == 1
        assert all(second[5][name] is tensor for name, tensor in views.items())


def test_layout_outside_the_slot_is_refused() -> None:
    bad = [{"name": "w1", "dtype": "bfloat16", "shape": [64, 64], "offset": 4096}]
    with pytest.raises(ProtocolError, match=r"'w1' spans bytes \[4096, 12288\) of a 8192-byte slot"):
        parse_layout(bad, 8192)
    with pytest.raises(ProtocolError, match="unknown dtype 'bfloat17'"):
        parse_layout([{**bad[0], "dtype": "bfloat17", "offset": 0}], 8192)


_CHILD = """
import gc, sys, torch
from expertd.client.views import SlabViews
from expertd.daemon.protocol import parse_layout
from expertd.daemon.service.slabs import HostSlab

slab = HostSlab("viewtest", 2, 4096)
slab.slot(1)[:4] = [1, 2, 3, 4]
layout = parse_layout([{"name": "w", "dtype": "uint8", "shape": [2, 2], "offset": 0}], 4096)
views = SlabViews(slab.handle(), layout)
w = views.tensors(1)["w"]
del views; slab.close(); gc.collect()  # the client and the daemon both let go of the slab
print(w.flatten().tolist(), flush=True)  # the view still reads it: its mapping lives with it
w[0, 0] = 9  # a write into a read-only mapping faults
print("wrote", flush=True)
"""


def test_views_outlive_their_slab_and_are_read_only() -> None:
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "[1, 2, 3, 4]\n", proc.stderr
    assert proc.returncode == -11, f"a write into a view must fault, got rc {proc.returncode}"


_CUDA_CHILD = """
import sys, msgpack, torch
from expertd.client.views import SlabViews
from expertd.daemon.protocol import parse_layout
handle = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
layout = parse_layout([{"name": "w", "dtype": "float32", "shape": [2, 3], "offset": 256}], 4096)
views = SlabViews(handle, layout)
print(views.tensors(1)["w"].flatten().tolist(), views.tensors(1)["w"].device, flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_slab_views_through_ipc() -> None:
    import msgpack

    from expertd.daemon.service.slabs import CudaDeviceSlab

    slab = CudaDeviceSlab(2, 4096)
    slab.slot(1)[256 : 256 + 24].view(torch.float32).copy_(torch.arange(6, dtype=torch.float32))
    torch.cuda.synchronize()
    handle = msgpack.packb(slab.handle(), use_bin_type=True)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CUDA_CHILD)], input=handle, capture_output=True, timeout=120
    )
    assert proc.stdout.decode() == "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0] cuda:0\n", proc.stderr.decode()
    slab.close()


def test_slab_views_refuse_an_unknown_kind() -> None:
    with pytest.raises(ProtocolError, match="unknown tier kind 'disk'"):
        SlabViews({"kind": "disk", "slots": 1, "slot_bytes": 4096}, ())
