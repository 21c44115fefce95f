"""Development tools that are not the library: the benchmarks (``hushchat bench``)
and the test-vector generator and verifier (``hushchat vectors``). Neither
``hushchat.protocol`` nor ``hushchat.transport`` imports anything from here; the
CLI finds these commands through the ``hushchat.commands`` entry points."""
