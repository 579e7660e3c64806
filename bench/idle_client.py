"""Open many idle HTTP/1.1 keep-alive connections and hold them.

    python3 bench/idle_client.py HOST PORT COUNT [--parallel 256] [--hold 60] [--setup-timeout 120]

Each connection sends one `GET /` with keep-alive, reads the whole response
(Content-Length or chunked), then stays open and idle. When COUNT are idle
the client prints `ready <open> <failed>` on stdout and holds them until
stdin closes or reaches EOF, a line is written to stdin, or --hold seconds
pass; then it closes them all and prints `closed <still-open>`, where
still-open counts connections the server had not closed meanwhile.
"""

import argparse
import asyncio
import os
import sys


async def one_request(host, port, timeout):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: idle-client\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = head.split(b" ", 2)[1]
        if not status.startswith(b"2"):
            raise RuntimeError(f"status {status.decode()}")
        length, chunked = None, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                raise RuntimeError("server asked to close")
        if chunked:
            while True:
                size = int((await asyncio.wait_for(reader.readline(), timeout)).split(b";")[0], 16)
                await asyncio.wait_for(reader.readexactly(size + 2), timeout)
                if size == 0:
                    break
        elif length:
            await asyncio.wait_for(reader.readexactly(length), timeout)
        return reader, writer
    except BaseException:
        writer.close()
        raise


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    p.add_argument("--parallel", type=int, default=256)
    p.add_argument("--hold", type=float, default=60)
    p.add_argument("--setup-timeout", type=float, default=120)
    a = p.parse_args()

    sem = asyncio.Semaphore(a.parallel)
    conns, errors = [], []

    async def open_one():
        async with sem:
            try:
                conns.append(await one_request(a.host, a.port, 10))
            except Exception as e:  # noqa: BLE001 - report and carry on
                errors.append(repr(e))

    try:
        await asyncio.wait_for(
            asyncio.gather(*(open_one() for _ in range(a.count))), a.setup_timeout
        )
    except asyncio.TimeoutError:
        errors.append("setup timed out")
    for e in sorted(set(errors))[:5]:
        print(f"error: {e}", file=sys.stderr)
    print(f"ready {len(conns)} {a.count - len(conns)}", flush=True)

    loop = asyncio.get_running_loop()
    stdin_line = loop.run_in_executor(None, sys.stdin.readline)
    try:
        await asyncio.wait_for(stdin_line, a.hold)
    except asyncio.TimeoutError:
        pass

    still_open = sum(1 for r, _ in conns if not r.at_eof())
    for _, w in conns:
        w.close()
    print(f"closed {still_open}", flush=True)
    # the executor thread may still sit in readline: do not wait for it
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
