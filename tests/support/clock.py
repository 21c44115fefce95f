"""The one fixed time the tests run at: the protocol never reads a clock, it is given one.

A test that needs another moment names it as an offset from :data:`NOW`
where it is used (for example ``NOW + SENDER_KEY_MAX_AGE``).
"""

# Seconds since the epoch (2023-11-14T22:13:20Z).
NOW = 1_700_000_000
