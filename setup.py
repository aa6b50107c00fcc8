"""Build script. Pure-Python for now; the C++/CUDA extension plugs in here (see csrc/)."""

from setuptools import setup

setup()
