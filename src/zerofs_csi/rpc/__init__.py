"""gRPC plumbing both roles share: the error interceptor, the Identity service, per-volume
try-locks.
"""
