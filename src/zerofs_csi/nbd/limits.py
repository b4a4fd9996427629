"""The attach path's bounds that parameter checks need, without loading the extension.

The controller validates a StorageClass's ``nbdConnections`` against these; importing
``attach`` (and so the Cython extension) there would tie the controller to the node's
kernel interface. ``MAX_CONNECTIONS`` is the extension's ``MAX_SOCKETS``, the size of its
socket arrays; a test keeps the two equal.
"""

# Connections per device when the server offers multi-conn. One: see ``attach`` on why
# several connections trade a server crash's stall for the kernel's 30 s timeout.
DEFAULT_CONNECTIONS = 1
MAX_CONNECTIONS = 16
