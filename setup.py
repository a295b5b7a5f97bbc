"""Builds the pack extension (csrc/) with the system compiler; no libtorch link (see csrc/README.md)."""

from setuptools import setup

setup()
