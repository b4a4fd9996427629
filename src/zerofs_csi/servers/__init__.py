"""The per-volume ZeroFS server: its interface, its configuration file, the 9P client that manages
its exports, and the two backends that run it (local child processes, pods).
"""
