"""Benchmarks of the node's hot paths against the tools the Go driver execs.

    python -m zerofs_csi.bench [--cycles N] [--output build/bench.json] [--only NAME ...]

Runs as root where the kernel has NBD (the microVM: ``make bench``). Every comparison
runs its contenders interleaved, cycle by cycle, in the same process against the same
server, because only ratios taken in one run mean anything under TCG. ``suite`` runs
them all and writes ``build/bench.json`` (``measure``) and the ratio chart (``chart``).
"""
