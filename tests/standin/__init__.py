"""Real servers for tests: diod, nbdkit and the ZeroFS stand-in (tools/zerofs-standin)."""
