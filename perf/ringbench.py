"""Time of one ring record written and read back, on whichever ring core is in use.

    python perf/ringbench.py                         # the C core when it was built
    ASERVER_PURE_PYTHON=1 python perf/ringbench.py   # the Python one

Batches of 50 records of --size bytes: write them, publish, read them back (copies),
release; prints µs per record for the write + read, best of --rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aserver import native
from aserver.ipc.ring import RingReader, RingWriter, attach_segment, create_segment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100, help="payload bytes per record")
    parser.add_argument("--records", type=int, default=200_000, help="records per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    name = f"aserver-ringbench-{uuid.uuid4().hex[:12]}"
    creator = create_segment(name, 8 << 20)
    wake_r, wake_w = os.pipe()
    space_r, space_w = os.pipe()
    writer = RingWriter(attach_segment(name), wake_w, space_r)
    reader = RingReader(attach_segment(name), wake_r, space_w)
    payload = b"x" * args.size
    best = float("inf")
    try:
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.records // 50):
                for _ in range(50):
                    writer.try_write(1, 5, payload)
                writer.publish()
                reader.read_batch(512)
                reader.release()
            best = min(best, (time.perf_counter() - start) / (args.records // 50 * 50))
    finally:
        writer.close()
        reader.close()
        creator.close()
        creator.unlink()
    print(f"{native.describe()}: {best * 1e6:.2f} us per {args.size}-byte record written and read")


if __name__ == "__main__":
    main()
