"""Tests of the Helm charts, the Dockerfile and the RBAC rules they carry."""
