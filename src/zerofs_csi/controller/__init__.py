"""The controller role: volumes as records, the nodes they may be published to, S3 clean-up on
delete. Never loads the NBD extension.
"""
