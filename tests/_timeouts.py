"""The one bound the tests put on a single wait.

``T`` bounds one operation: a call and its answer, a frame arriving, a connection closing, a child
process starting or stopping.  They normally take milliseconds; ``T`` is generous so that a loaded
machine does not fail them, and a hang fails within it rather than at the whole run's timeout.  A
wait that covers several operations in a row, or that starts a Python interpreter, is written as a
multiple of ``T`` where it stands.
"""

T = 10.0
