# setuptools entry point only for cffi_modules, which pyproject.toml cannot express.
from setuptools import setup

setup(cffi_modules=["cffi_build/build.py:ffibuilder"])
