"""hushchat's pure protocol core: no I/O, no clocks, randomness injected.

The public API is re-exported here; see README.md and spec/.
"""
