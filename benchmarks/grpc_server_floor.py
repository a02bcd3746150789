"""What grpcio's Python server costs per call before any Essaim code runs: the coordinator's floor.

Usage: python benchmarks/grpc_server_floor.py [--rate 1000 --seconds 8]

A server whose one method returns 40 bytes and does nothing else, at --rate calls a second
(open loop, 200-byte requests, from two client processes of 32 threads), as the threaded
server the coordinator runs (grpc.server with a thread pool, 32 threads and 8) and as the
asyncio server (grpc.aio). Prints each server's CPU per call and in cores, side by side in
one run, and ends with a JSON line. 10,000 workers send 1,167 calls a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import threading
import time
from concurrent import futures

import grpc

SERVICE, METHOD = "floor.Floor", "Call"


def _handler(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"x" * 40


async def _async_handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"x" * 40


def _method_handlers(handler) -> grpc.GenericRpcHandler:  # type: ignore[no-untyped-def]
    call = grpc.unary_unary_rpc_method_handler(handler, request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: call})


def serve(kind: str, ready: mp.Queue, stop: mp.Event) -> None:
    if kind.startswith("threads"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(kind.split("-")[1])))
        server.add_generic_rpc_handlers((_method_handlers(_handler),))
        ready.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        stop.wait()
        server.stop(grace=None)
        return

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_method_handlers(_async_handler),))
        ready.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.stop(grace=None)

    asyncio.run(main())


def client(port: int, rate: float, seconds: float) -> None:
    stub = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/{METHOD}")
    stub(b"y" * 200)  # connected before the clock starts
    started, counter, lock = time.perf_counter(), iter(range(10**9)), threading.Lock()

    def loop() -> None:
        while True:
            with lock:
                due = started + next(counter) / rate
            if due > started + seconds:
                return
            time.sleep(max(0.0, due - time.perf_counter()))
            stub(b"y" * 200)

    threads = [threading.Thread(target=loop) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, rate: float, seconds: float) -> dict:
    ready, stop = mp.Queue(), mp.Event()
    server = mp.Process(target=serve, args=(kind, ready, stop))
    server.start()
    try:
        port = ready.get(timeout=30)
        clients = [mp.Process(target=client, args=(port, rate / 2, seconds)) for _ in range(2)]
        before, wall = cpu_seconds(server.pid), time.perf_counter()
        for process in clients:
            process.start()
        for process in clients:
            process.join()
        cpu, wall = cpu_seconds(server.pid) - before, time.perf_counter() - wall
    finally:
        stop.set()
        server.join(timeout=10)
    calls = rate * seconds
    return {"server": kind, "cores": cpu / wall, "us_per_call": 1e6 * cpu / calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    results = [measure(kind, args.rate, args.seconds) for kind in ("threads-32", "threads-8", "asyncio")]
    print(f"{'server':12} {'cores':>7} {'us a call':>10}   (a no-op method at {args.rate:,.0f} calls/s)")
    for result in results:
        print(f"{result['server']:12} {result['cores']:7.3f} {result['us_per_call']:10.0f}")
    print(json.dumps({"rate": args.rate, **{r["server"]: round(r["us_per_call"], 1) for r in results}}))


if __name__ == "__main__":
    main()
