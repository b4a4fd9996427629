# cython: language_level=3
"""Kernel-facing attach path for zerofs-csi: NBD netlink, ioctls and handshake."""

# Generic netlink command numbers, from include/uapi/linux/nbd-netlink.h (enum nbd_commands).
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_LINK_DEAD = 4
NBD_CMD_STATUS = 5
