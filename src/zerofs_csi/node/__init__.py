"""The node role: stage a volume once per node (server, attach, mkfs, mount), publish it into pods,
heal after a restart.
"""
