import pytest
import torch

from workers.backends.torch_device import resolve_device, resolve_dtype, set_cpu_threads
from workers.errors import DeviceError


def test_cpu_resolves():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:99"])
def test_bad_devices_are_refused_by_name(name):
    with pytest.raises(DeviceError, match=name):
        resolve_device(name)


def test_dtypes():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    with pytest.raises(DeviceError, match="float8"):
        resolve_dtype("float8")


def test_threads_must_be_positive():
    with pytest.raises(DeviceError, match="at least 1"):
        set_cpu_threads(0)
