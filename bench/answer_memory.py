#!/usr/bin/env python3
"""answer_memory.py RRNSERVE MODELS_DIR MODEL TEXT [--chars 100000] [--clients 1,8]
       [--path /attention|/score|/v1/completions]

How much memory a server takes to answer requests whose answers grow with
their text: starts RRNSERVE serve on MODELS_DIR (CPU, a free port), sends
one short request so that the model is warm, then for each number of
clients N sends N requests at once, each the first --chars characters of
TEXT to --path (/attention; /score with logprobs; /v1/completions echoing
it with 5 alternatives a token, as evaluation harnesses ask), and prints the
server's peak resident memory above its idle size while they ran (the
kernel's high-water mark, reset before each round through
/proc/PID/clear_refs), the answers' size and the time.  Compare two builds
by running each in turn.  Linux only; standard library only.
"""
import argparse
import json
import socket
import subprocess
import threading
import time
import urllib.request


def kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=900) as r:
        return len(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rrnserve")
    ap.add_argument("models")
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--chars", type=int, default=100000)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--path", default="/attention")
    a = ap.parse_args()
    with open(a.text, encoding="utf-8") as f:
        text = f.read()[:a.chars]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([a.rrnserve, "serve", "--device", "cpu", "--models", a.models, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = {"model": a.model, "text": text}
        if a.path == "/score":
            body["logprobs"] = True
        elif a.path == "/v1/completions":
            body = {"model": a.model, "prompt": text, "echo": True, "max_tokens": 0, "logprobs": 5}
        for _ in range(600):
            try:
                post(port, a.path, dict(body, **{"text" if "text" in body else "prompt": text[:100]}))
                break
            except OSError:
                time.sleep(0.1)
        idle = kib(server.pid, "VmRSS")
        print(f"{a.rrnserve}: idle {idle / 1024:.0f} MiB", flush=True)
        for n in [int(c) for c in a.clients.split(",")]:
            with open(f"/proc/{server.pid}/clear_refs", "w") as f:
                f.write("5")
            sizes = []
            threads = [threading.Thread(target=lambda: sizes.append(post(port, a.path, body))) for _ in range(n)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            peak = kib(server.pid, "VmHWM")
            print(f"  {n} x {a.path} of {a.chars} characters: peak {(peak - idle) / 1024:.0f} MiB above idle, "
                  f"answers {max(sizes) / 1e6:.1f} MB each, {time.monotonic() - t0:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
