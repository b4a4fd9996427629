"""What the driver tells its operators: metrics, the probe endpoint, Events and logs, and the
secrets kept out of them.
"""
