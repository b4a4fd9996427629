"""The Kubernetes backend of the per-volume ZeroFS servers.

``objects`` builds the Secret and Pod manifests (pure functions), ``api`` creates the
API client and maps API failures to CSI errors, ``owner`` finds the node DaemonSet that
owns the per-volume pods, ``backend`` runs the lifecycle, ``rbac`` lists the API access
the node plugin needs.
"""
