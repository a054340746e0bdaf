#!/usr/bin/env python3
"""stream_interference.py URL MODEL TEXT [--tokens 400] [--long 100000] [--seconds 20]
       [--loads prompt,score,attention,batch]

How much other work on a language model holds back the tokens of a
generation it is streaming: a running server is sent one stream (a short
prompt, --tokens tokens) and, meanwhile, each of three loads in turn:

  prompt   a generation whose prompt is the first --long characters of
           TEXT, and 300-character prompts one after another beside it
  score    /score of the first --long characters of TEXT
  attention  /attention of the same characters (a model with attention)
  batch    32 clients scoring 900-character pieces of TEXT one after
           another, for --seconds

For each it prints the stream's largest wait for a token while the load
ran and its 99th percentile, and what the load got done (the long
prompt's or the long score's time, the short requests' latencies, the
scores a second).  Compare two builds by serving each in turn on the same
machine.  Standard library only.
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse


def post(conn, path, body):
    conn.request("POST", path, json.dumps(body))
    return conn.getresponse()


class Stream(threading.Thread):
    """The stream: the arrival time of each of its token events."""

    def __init__(self, a):
        super().__init__()
        self.a, self.times = a, []

    def run(self):
        conn = http.client.HTTPConnection(self.a.host, self.a.port, timeout=600)
        r = post(conn, "/generate", {"model": self.a.model, "prompt": "It is a truth", "seed": 1,
                                     "max_tokens": self.a.tokens, "stream": True})
        for line in r:
            if line.startswith(b"data: ") and b'"token"' in line:
                self.times.append(time.monotonic())

    def started(self):
        while len(self.times) < 10 and self.is_alive():
            time.sleep(0.01)

    def gaps(self, t0, t1):
        return sorted(b - a for a, b in zip(self.times, self.times[1:]) if b > t0 and a < t1)


def repeat(a, body_of, stop, out):
    """One client sending body_of(i) to /score or /generate until stop."""
    conn = http.client.HTTPConnection(a.host, a.port, timeout=600)
    i = 0
    while not stop.is_set():
        path, body = body_of(i)
        t = time.monotonic()
        json.load(post(conn, path, body))
        out.append(time.monotonic() - t)
        i += 1


def run_load(a, text, name):
    s = Stream(a)
    s.start()
    s.started()
    stop, done = threading.Event(), []
    clients = []
    if name == "prompt":
        short = lambda i: ("/generate", {"model": a.model, "prompt": text[a.long + 300 * i:a.long + 300 * (i + 1)],
                                         "max_tokens": 1, "seed": i})
        clients = [threading.Thread(target=repeat, args=(a, short, stop, done))]
    elif name == "batch":
        piece = lambda k: lambda i: ("/score", {"model": a.model,
                                                "text": text[(k * 7919 + i * 911) % (len(text) - 900):][:900]})
        clients = [threading.Thread(target=repeat, args=(a, piece(k), stop, done)) for k in range(32)]
    for c in clients:
        c.start()
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(a.host, a.port, timeout=600)
    if name == "prompt":
        json.load(post(conn, "/generate", {"model": a.model, "prompt": text[:a.long], "max_tokens": 1, "seed": 2}))
    elif name in ("score", "attention"):
        json.load(post(conn, "/" + name, {"model": a.model, "text": text[:a.long]}))
    else:
        time.sleep(a.seconds)
    t1 = time.monotonic()
    stop.set()
    for c in clients:
        c.join()
    s.join()
    gaps = s.gaps(t0, t1)
    line = (f"{name:9}  stream: largest wait {gaps[-1] * 1000:6.0f} ms, 99th percentile "
            f"{gaps[int(len(gaps) * 0.99)] * 1000:6.0f} ms;  ")
    if name == "prompt":
        done.sort()
        line += (f"the {a.long}-character prompt {t1 - t0:.2f} s, {len(done)} 300-character prompts beside it "
                 f"(median {done[len(done) // 2] * 1000:.0f} ms, at most {done[-1] * 1000:.0f} ms)")
    elif name in ("score", "attention"):
        line += f"/{name} of {a.long} characters {t1 - t0:.2f} s"
    else:
        line += f"{len(done) / (t1 - t0):.1f} scores a second"
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=400, help="the stream's tokens (more than the loads last)")
    ap.add_argument("--seconds", type=float, default=20, help="how long the batch load runs")
    ap.add_argument("--long", type=int, default=100000, help="characters of the long prompt and score")
    ap.add_argument("--loads", default="prompt,score,attention,batch")
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    a.host, a.port = u.hostname, u.port or 80
    with open(a.text, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    for name in a.loads.split(","):
        run_load(a, text, name)


if __name__ == "__main__":
    main()
