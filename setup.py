"""Optional C accelerators for the hot paths; everything else is in pyproject.toml.

Each module has a pure-Python twin that is used when the compiled one is missing (no C
compiler where the package was installed: `optional=True` turns a failed build into a
warning). `gb28181 serve` logs which one runs; the benchmarks print it.
"""

from setuptools import Extension, setup

ACCELERATORS = [
    # media: batched RTP receive (recvmmsg) with the in-order fast path of RtpIngest, and the
    # H.264/H.265 start-code scan of the FLV muxer.
    Extension("media._fast", ["src/media/_fast.c"], optional=True),
    Extension("gb28181.sip._fast", ["src/gb28181/sip/_fast.c"], optional=True),
]

setup(ext_modules=ACCELERATORS)
