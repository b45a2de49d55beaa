"""A real RTMP ingest for the tests: FFmpeg's RTMP server mode (through PyAV, `listen=1`) accepts one publisher and
copies every packet it receives into an FLV file, as a media server records a live stream.

    python tests/kit/rtmp_ingest.py rtmp://127.0.0.1:PORT/live/KEY out.flv

It prints `listening` before it waits, `receiving <streams>` once a publisher connected, and `ended <packets>` when
the publisher went away (then exits 0). Killed, it leaves what it flushed so far (packets are flushed as they come).

    python tests/kit/rtmp_ingest.py rtmp://127.0.0.1:PORT/live/KEY - --drop-after 0.3

A hostile ingest instead: it accepts each publisher, reads for 0.3 s, drops it and listens again, printing
`accepted <monotonic seconds>` for each (until killed).
"""

from __future__ import annotations

import sys
import time

import av


def main(url: str, path: str) -> int:
    print("listening", flush=True)
    source = av.open(url, mode="r", format="flv", options={"listen": "1"})
    print("receiving", " ".join(s.type for s in source.streams), flush=True)
    packets = 0
    with av.open(path, mode="w", format="flv", options={"flush_packets": "1"}) as sink:
        streams = {s.index: sink.add_stream_from_template(s) for s in source.streams if s.type in ("video", "audio")}
        try:
            for packet in source.demux():
                if packet.dts is None or packet.stream.index not in streams:
                    continue
                packet.stream = streams[packet.stream.index]
                sink.mux(packet)
                packets += 1
        except (av.error.EOFError, OSError):  # the publisher went away (FFmpeg reports EIO)
            pass
    print("ended", packets, flush=True)
    return 0


def drop_after_accept(url: str, seconds: float) -> int:
    print("listening", flush=True)
    while True:
        try:
            source = av.open(url, mode="r", format="flv", options={"listen": "1"})
        except (av.error.FFmpegError, OSError):
            continue
        print("accepted", time.monotonic(), flush=True)
        end = time.monotonic() + seconds
        try:
            for _ in source.demux():
                if time.monotonic() > end:
                    break
        except (av.error.FFmpegError, OSError):
            pass
        source.close()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[3] == "--drop-after":
        sys.exit(drop_after_accept(sys.argv[1], float(sys.argv[4])))
    sys.exit(main(sys.argv[1], sys.argv[2]))
