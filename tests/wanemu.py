#!/usr/bin/env python3
"""wanemu.py - build / tear down an emulated WAN of N network namespaces.

(The project's shared tool, copied here so that tests and benchmarks run from a clone.)

    wanemu.py up   -n 3 --delay-ms 50 --rate-mbit 100 [--prefix wan] [--subnet 10.213.0]
                   [--mode auto|netem|tun|bridge] [--mtu 1500]
    wanemu.py down [--prefix wan]
    wanemu.py probe            # prints which modes this kernel supports

Node i (0-based) lives in netns "<prefix><i>" with address <subnet>.<i+1>/24
(default 10.213.0.0/24, a range that only exists inside these namespaces).
Link model (both modes): each node's egress = rate limit + one-way delay;
each node's downlink is rate limited too.  RTT(A,B) = delay(A) + delay(B).

mode netem: router netns "<prefix>rt" holds bridge br0; veth per node;
            node-side egress: netem delay+rate; bridge-side egress: tbf (downlink).
            Needs CONFIG_NET_SCH_NETEM (absent from some kernels, e.g. the one on the project's CI machines).
mode tun:   no netem needed. Each node gets a TUN device (owned by a small
            Python delay-router daemon running in the caller's netns but holding
            no address there). Kernel tbf on the TUN (node egress = rate);
            the daemon adds the delay and paces each node's downlink.
            Devices vanish automatically if the daemon dies.
mode bridge: netem topology with tbf instead of netem: rate limit only, no delay.
Requires root (or CAP_NET_ADMIN+CAP_SYS_ADMIN, e.g. inside `unshare -Urnm`).
"""
import argparse, ctypes, fcntl, heapq, json, os, select, signal, struct, subprocess, sys, time

STATE_DIR = os.environ.get("WANEMU_STATE_DIR", "/tmp/wanemu-state")
TUN_DEV = os.environ.get("WANEMU_TUN", "/dev/net/tun")   # e.g. a private 0666 copy made with mknod
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def sh(*cmd, check=True, quiet=False):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> rc={r.returncode}: {r.stderr.strip()}")
    return r


def state_path(prefix):
    return os.path.join(STATE_DIR, f"{prefix}.json")


def netem_available():
    ns = f"wanemuprobe{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        r = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
               "netem", "delay", "1ms", check=False)
        return r.returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


def tbf_args(rate_mbit, latency_ms=100):
    # burst must be >= rate/HZ; 64 KiB is plenty up to a few Gbit/s.
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", f"{latency_ms}ms"]


# ---------------------------------------------------------------- netem mode
def up_netem(a):
    rt = f"{a.prefix}rt"
    sh("ip", "netns", "add", rt)
    sh("ip", "-n", rt, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", rt, "link", "set", "br0", "up")
    for i in range(a.n):
        ns = f"{a.prefix}{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{a.prefix}n{i}", "type", "veth", "peer", "name", f"{a.prefix}b{i}")
        sh("ip", "link", "set", f"{a.prefix}n{i}", "netns", ns, "name", "eth0")
        sh("ip", "link", "set", f"{a.prefix}b{i}", "netns", rt)
        sh("ip", "-n", rt, "link", "set", f"{a.prefix}b{i}", "master", "br0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "mtu", str(a.mtu), "up")
        sh("ip", "-n", ns, "addr", "add", f"{a.subnet}.{i+1}/24", "dev", "eth0")
        if a.mode == "netem":
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
               "delay", f"{a.delay_ms}ms", "rate", f"{a.rate_mbit}mbit", "limit", "10000")
        else:   # mode bridge: kernel-only, rate limit but NO delay (for kernels without netem)
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf_args(a.rate_mbit))
        sh("ip", "netns", "exec", rt, "tc", "qdisc", "add", "dev", f"{a.prefix}b{i}", "root",
           *tbf_args(a.rate_mbit))
    return {"mode": a.mode, "namespaces": [f"{a.prefix}{i}" for i in range(a.n)] + [rt]}


# ---------------------------------------------------------------- tun mode
_libc = ctypes.CDLL(None, use_errno=True)


def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


def router_main(a):
    """Daemon: create TUN per node, then forward IPv4 packets with delay + downlink pacing."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds, ip2idx = [], {}
    for i in range(a.n):
        ns = f"{a.prefix}{i}"
        setns(f"/run/netns/{ns}")
        fd = os.open(TUN_DEV, os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"wan0", IFF_TUN | IFF_NO_PI))
        fds.append(fd)
        ip2idx[bytes(int(x) for x in f"{a.subnet}.{i+1}".split("."))] = i
    if _libc.setns(home, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back")
    for i in range(a.n):
        ns = f"{a.prefix}{i}"
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "wan0", "mtu", str(a.mtu), "txqueuelen", "1000", "up")
        sh("ip", "-n", ns, "addr", "add", f"{a.subnet}.{i+1}/24", "dev", "wan0")
        # node egress (uplink) rate: kernel tbf on the TUN device
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "wan0", "root", *tbf_args(a.rate_mbit))
    delay = a.delay_ms / 1000.0
    bps = a.rate_mbit * 1e6 / 8.0
    qlimit = a.downlink_queue_ms / 1000.0
    busy = [0.0] * a.n                     # downlink serialisation horizon per node
    heap = []
    stats = {"fwd": 0, "drop_noroute": 0, "drop_queue": 0}
    ep = select.epoll()
    for fd in fds:
        ep.register(fd, select.EPOLLIN)
    class Stop(Exception):
        pass

    def _stop(*_):
        raise Stop()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with open(a.ready_file, "w") as f:
        f.write(str(os.getpid()))
    try:
        _loop(ep, fds, ip2idx, heap, busy, delay, bps, qlimit, stats)
    except Stop:
        pass
    print(json.dumps(stats), flush=True)


def _loop(ep, fds, ip2idx, heap, busy, delay, bps, qlimit, stats):
    now = time.monotonic
    read, write, push, pop = os.read, os.write, heapq.heappush, heapq.heappop
    seq = 0
    while True:
        t = now()
        timeout = max(0.0, heap[0][0] - t) if heap else 0.5
        try:
            events = ep.poll(timeout, 64)
        except InterruptedError:
            continue
        t = now()
        for fd, _ in events:
            for _k in range(32):           # drain a few packets per wakeup
                try:
                    pkt = read(fd, 65536)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or (pkt[0] >> 4) != 4:
                    continue                # IPv4 only
                j = ip2idx.get(pkt[16:20])
                if j is None:
                    stats["drop_noroute"] += 1
                    continue
                arr = t + delay
                start = busy[j] if busy[j] > arr else arr
                if start - arr > qlimit:
                    stats["drop_queue"] += 1
                    continue
                busy[j] = start + len(pkt) / bps
                seq += 1
                push(heap, (busy[j], seq, fds[j], pkt))
        t = now()
        while heap and heap[0][0] <= t:
            _, _, dfd, pkt = pop(heap)
            try:
                write(dfd, pkt)
                stats["fwd"] += 1
            except OSError:
                pass


def up_tun(a, st):
    for i in range(a.n):
        sh("ip", "netns", "add", f"{a.prefix}{i}")
    ready = st + ".ready"
    if os.path.exists(ready):
        os.unlink(ready)
    log = open(st + ".log", "w")
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_router", "-n", str(a.n),
                          "--prefix", a.prefix, "--subnet", a.subnet, "--delay-ms", str(a.delay_ms),
                          "--rate-mbit", str(a.rate_mbit), "--mtu", str(a.mtu),
                          "--downlink-queue-ms", str(a.downlink_queue_ms), "--ready-file", ready],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(200):
        if os.path.exists(ready):
            break
        if p.poll() is not None:
            raise RuntimeError("router died: " + open(st + ".log").read())
        time.sleep(0.025)
    else:
        raise RuntimeError("router not ready")
    return {"mode": "tun", "router_pid": p.pid, "namespaces": [f"{a.prefix}{i}" for i in range(a.n)]}


# ---------------------------------------------------------------- up/down
def cmd_up(a):
    os.makedirs(STATE_DIR, exist_ok=True)
    st = state_path(a.prefix)
    if os.path.exists(st):
        sys.exit(f"{st} exists; run 'down --prefix {a.prefix}' first")
    mode = a.mode
    if mode == "auto":
        mode = "netem" if netem_available() else "tun"
    a.mode = mode
    t0 = time.monotonic()
    info = {}
    try:
        info = up_tun(a, st) if mode == "tun" else up_netem(a)
    except Exception:
        info.setdefault("namespaces", [f"{a.prefix}{i}" for i in range(a.n)] + [f"{a.prefix}rt"])
        _teardown(info)
        raise
    info.update(n=a.n, delay_ms=a.delay_ms, rate_mbit=a.rate_mbit,
                addrs={f"{a.prefix}{i}": f"{a.subnet}.{i+1}" for i in range(a.n)})
    with open(st, "w") as f:
        json.dump(info, f)
    print(json.dumps({**info, "setup_s": round(time.monotonic() - t0, 3)}))


def _teardown(info):
    pid = info.get("router_pid")
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(250):            # wait until gone (or a zombie)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
                time.sleep(0.02)
        except (ProcessLookupError, FileNotFoundError):
            pass
    for ns in info.get("namespaces", []):
        sh("ip", "netns", "del", ns, check=False)


def cmd_down(a):
    st = state_path(a.prefix)
    if not os.path.exists(st):
        print("nothing to do")
        return
    info = json.load(open(st))
    _teardown(info)
    os.unlink(st)
    for suf in (".ready",):
        if os.path.exists(st + suf):
            os.unlink(st + suf)
    print(json.dumps({"down": info["namespaces"]}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["up", "down", "probe", "_router"])
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--prefix", default="wan")
    ap.add_argument("--subnet", default="10.213.0")
    ap.add_argument("--delay-ms", type=float, default=50)
    ap.add_argument("--rate-mbit", type=float, default=100)
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--downlink-queue-ms", type=float, default=100)
    ap.add_argument("--mode", choices=["auto", "netem", "tun", "bridge"], default="auto")
    ap.add_argument("--ready-file")
    a = ap.parse_args()
    if a.cmd == "up":
        cmd_up(a)
    elif a.cmd == "down":
        cmd_down(a)
    elif a.cmd == "probe":
        print(json.dumps({"netem": netem_available(), "tun": os.access(TUN_DEV, os.R_OK | os.W_OK)}))
    else:
        router_main(a)


if __name__ == "__main__":
    main()
