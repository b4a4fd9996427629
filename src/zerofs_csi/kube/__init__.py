"""The Kubernetes API as the driver uses it: the client and its failures as CSI errors (``api``),
and the API access each plugin needs as RBAC rules (``rbac``, ``controller_rbac``).
"""
