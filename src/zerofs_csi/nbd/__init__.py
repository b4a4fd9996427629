"""The kernel NBD attach path: the Cython extension ``_nbd`` (netlink, handshake, ioctl fallback,
readiness) and ``attach`` on top of it.

``limits`` holds the numbers the volume settings check against, so that code which only validates
parameters does not load the extension.
"""
