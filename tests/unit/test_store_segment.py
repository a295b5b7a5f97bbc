"""The mapped segment: a client maps the holder's memfd and views objects by holder address."""

from __future__ import annotations

import os

import pytest
import torch

from specctl.errors import StoreError
from specctl.store.segment import Mapping, Where

pytestmark = pytest.mark.unit
MiB = 1 << 20


@pytest.fixture
def memfd():
    name = "specctl-segment-test"
    fd = os.memfd_create(name)
    os.ftruncate(fd, MiB)
    yield fd, name
    os.close(fd)


def test_views_by_holder_address_share_the_holder_pages(memfd) -> None:
    fd, name = memfd
    base = 0x7F00_0000_0000  # where the holder mapped it: any address, offsets matter
    where = Where(os.getpid(), fd, base, MiB, name)
    assert Where.loads(where.dumps()) == where
    m = Mapping(where)
    v = m.view(base + 4096, 8)
    v.copy_(torch.arange(8, dtype=torch.uint8))
    assert os.pread(fd, 8, 4096) == bytes(range(8))  # the holder's pages, not a copy
    with pytest.raises(StoreError, match="outside the store's segment"):
        m.view(base + MiB - 4, 8)
    with pytest.raises(StoreError, match="outside"):
        m.view(base - 1, 1)
    m.close()


def test_another_file_under_the_same_pid_and_fd_is_refused(memfd, tmp_path) -> None:
    fd, name = memfd
    with pytest.raises(OSError, match="not the store's segment"):
        Mapping(Where(os.getpid(), fd, 0, MiB, "specctl-segment-other"))
    other = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="not the store's segment"):
            Mapping(Where(os.getpid(), other, 0, MiB, name))
    finally:
        os.close(other)
    with pytest.raises(OSError):  # no such process or fd: another host
        Mapping(Where(2**22 + 7, 99, 0, MiB, name))
