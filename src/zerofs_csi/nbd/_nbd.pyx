# cython: language_level=3
"""Kernel-facing attach path: NBD generic netlink, the NBD client handshake, the ioctl
fallback, device facts from sysfs and readiness after connect.

Every blocking system call runs with the GIL released; errors are raised after the GIL
is taken back. No module-level state holds a session: each object owns its sockets.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc

from zerofs_csi.nbd cimport _nbd_linux as c

import errno as _errno
import os as _os

# One extension module, its source in parts (textual includes, in this order: each part
# uses only what the parts before it define).
include "constants.pxi"
include "errors.pxi"
include "netlink_messages.pxi"
include "netlink.pxi"
include "handshake_wire.pxi"
include "handshake.pxi"
include "handshake_probes.pxi"
include "device.pxi"
include "ioctl.pxi"
