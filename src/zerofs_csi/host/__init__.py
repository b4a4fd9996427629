"""Linux calls without policy: mount(2) and mountinfo, libblkid probes, mkfs and growing
filesystems.
"""
