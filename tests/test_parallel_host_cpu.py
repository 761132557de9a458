"""The CPU as several XLA devices (mtop_jax.parallel.host_cpu)."""

import os
import subprocess
import sys

import jax
import pytest

from mtop_jax.errors import MtopError
from mtop_jax.parallel.host_cpu import default_host_cpu_devices, use_host_cpu_devices


def test_default_is_the_most_devices_one_per_core_that_split_the_batch_evenly():
    assert default_host_cpu_devices(32, cores=2) == 2
    assert default_host_cpu_devices(30, cores=4) == 3
    assert default_host_cpu_devices(7, cores=2) == 1
    assert default_host_cpu_devices(4, cores=64) == 4


def test_after_jax_started_it_hands_out_the_devices_there_are_or_names_the_flag(devices):
    assert use_host_cpu_devices(2) == jax.devices("cpu")[:2]
    with pytest.raises(MtopError, match="already started with 8.*xla_force_host_platform"):
        use_host_cpu_devices(9)
    with pytest.raises(MtopError, match=">= 1"):
        use_host_cpu_devices(0)


def test_before_jax_starts_it_sets_the_count_replacing_one_already_in_xla_flags():
    code = ("import os; from mtop_jax.parallel.host_cpu import use_host_cpu_devices as u; "
            "d = u(3); import jax; print(len(d), jax.device_count(), os.environ['XLA_FLAGS'])")
    env = {"JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                        "--xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[:2] == ["3", "3"]
    assert out[2:] == ["--xla_backend_optimization_level=0",
                       "--xla_force_host_platform_device_count=3"]


def test_before_jax_starts_a_larger_count_already_in_xla_flags_is_kept():
    code = ("import os; from mtop_jax.parallel.host_cpu import use_host_cpu_devices as u; "
            "d = u(2); import jax; print(len(d), jax.device_count())")
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["2", "4"]
