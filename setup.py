"""Only what pyproject.toml cannot say: the cffi extension module is built here."""

from setuptools import setup

setup(cffi_modules=["vmm/kvm/_build.py:ffibuilder"])
