"""Tests of the Kubernetes backend, against a real or an in-process fake API server."""
