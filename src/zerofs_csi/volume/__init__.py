"""A volume's description: its id, its settings from the StorageClass, the context handed to the
node, the capabilities it may be used with.
"""
