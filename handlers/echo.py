"""Echo service.

cmd_id 1 answers with the request's seq_num, cmd_id, user_id and body.
cmd_id 2 does the same after about 200 µs of pure-Python CPU work: a stand-in for a
handler with real business logic, to measure how throughput scales with workers.

Both take their bodies zero_copy (see App.handler): a view of the shared-memory ring,
returned as the reply, so the worker copies a body once (into the reply ring), not twice.
"""

from aserver import App, Request

app = App("echo")

ECHO = 1
ECHO_AFTER_WORK = 2

# Iterations of the integer loop below that take about 200 µs on the reference machine
# (2-core x86 VM, CPython 3.11); see perf/README.md.
WORK_ITERATIONS = 1500


def burn(iterations: int = WORK_ITERATIONS) -> int:
    """Integer arithmetic the interpreter cannot skip (no sleep, no I/O)."""
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


@app.handler(ECHO, zero_copy=True)
def echo(request: Request) -> bytes | memoryview:
    return request.body


@app.handler(ECHO_AFTER_WORK, zero_copy=True)
def echo_after_work(request: Request) -> bytes | memoryview:
    burn()
    return request.body
