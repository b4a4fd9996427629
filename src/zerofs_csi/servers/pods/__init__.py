"""Per-volume ZeroFS servers as pods: the Kubernetes backend.

``objects`` builds the Secret and Pod manifests (pure functions), ``owner`` finds the node
DaemonSet that owns the per-volume pods, ``backend`` runs the lifecycle.
"""
