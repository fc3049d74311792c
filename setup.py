"""Build hook for the optional C frame scanner; all metadata lives in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the proxy uses the
pure-Python scanner (amqproxy.amqp.scan), which gives the same results with more CPU per frame.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "amqproxy.amqp._scan",
            ["src/amqproxy/amqp/_scan.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
