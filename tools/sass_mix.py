#!/usr/bin/env python3
"""sass_mix.py [--source FILE.cu] [--arch sm_90] [--min N] KERNEL - what a
CUDA kernel compiles to, read without a GPU: its registers and spills (ptxas),
and for each loop of its machine code (SASS) how many instructions it holds
and of which kinds (both arms of a branch in it count, so for a loop that
branches it is more than one pass runs).

A kernel bound by what it issues runs about as fast as its loops are short:
the inner loop of the fused recurrent kernel (recurrent_step_kernel) is 81
instructions, 64 of them multiply-adds and 8 loads from shared memory, 16
bytes each.  It says nothing of
memory latency or of how often each loop runs; a GPU's profile does.

The toolkit here (CUDA 13) has nvcc but no disassembler, so the script takes
nvdisasm from Debian's non-free nvidia-cuda-toolkit 11.8 (downloaded once into
build/tools, its SHA-256 checked).  That nvdisasm knows sm_90's instructions
but not CUDA 13's cubin header, so the header is rewritten to the older layout
first (ELF ABI 7: OS/ABI 0x33, the SM in e_flags' low byte); the code is not
touched.  The loops come from nvdisasm's control-flow graph (-bbcfg): a loop
is an edge back to an earlier block, with the blocks between.

KERNEL is a substring of the kernel's mangled name (cell_step_kernel).
"""
import argparse
import collections
import glob
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEB_URL = ("http://deb.debian.org/debian/pool/non-free/n/nvidia-cuda-toolkit/"
           "nvidia-cuda-toolkit_11.8.89~11.8.0-5~deb12u1_amd64.deb")
DEB_SHA256 = "d1156026e704fe0368b6295db06224ed00a727966fb13454f34e3f3102db0457"
TOOLS = os.path.join(ROOT, "build", "tools")


def die(msg):
    sys.exit("sass_mix.py: " + msg)


def find_nvdisasm():
    for path in (os.environ.get("NVDISASM"), shutil.which("nvdisasm"), "/usr/local/cuda/bin/nvdisasm",
                 os.path.join(TOOLS, "usr", "bin", "nvdisasm")):
        if path and os.access(path, os.X_OK):
            return path
    os.makedirs(TOOLS, exist_ok=True)
    deb = os.path.join(TOOLS, "nvidia-cuda-toolkit.deb")
    print("sass_mix.py: fetching nvdisasm from %s" % DEB_URL, file=sys.stderr)
    with urllib.request.urlopen(DEB_URL, timeout=300) as r, open(deb, "wb") as f:
        shutil.copyfileobj(r, f)
    with open(deb, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != DEB_SHA256:
            os.unlink(deb)
            die("the downloaded package's SHA-256 is not the expected one")
    subprocess.run(["dpkg-deb", "-x", deb, TOOLS], check=True)
    os.unlink(deb)
    return os.path.join(TOOLS, "usr", "bin", "nvdisasm")


def compile_cubin(source, arch, out):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cmd = [nvcc, "-O2", "-std=c++17", "-I" + os.path.dirname(os.path.abspath(source)), "-DRRN_CUDA", "-cubin",
           "-arch", arch, "-Xptxas", "-v", source, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        die("nvcc failed:\n" + r.stderr)
    return r.stderr


def older_header(cubin, arch):
    """CUDA 13's cubin header in the layout nvdisasm 11.8 reads."""
    b = bytearray(open(cubin, "rb").read())
    if b[7] == 0x41:  # CUDA 13: OS/ABI 0x41, ELF ABI version 8
        sm = int(arch[3:])
        b[7], b[8] = 0x33, 7
        # the SM, then EF_CUDA_64BIT_ADDRESS | EF_CUDA_TEXMODE_UNIFIED, then the virtual SM
        struct.pack_into("<I", b, 48, sm | 0x500 | sm << 16)
    open(cubin, "wb").write(b)


def ptxas_lines(log, kernel):
    lines, mine = [], False
    for line in log.splitlines():
        if "Compiling entry function" in line:
            mine = kernel in line
        elif mine and ("registers" in line or "spill" in line):
            # "ptxas info    : Used 111 registers, ..." or "    32 bytes stack frame, ..."
            lines.append("ptxas: " + (line.split(":", 1)[1] if "ptxas" in line else line).strip())
    return lines


def functions(dot):
    """name -> (blocks, edges, index) of each function in nvdisasm's
    control-flow graph (-bbcfg): its basic blocks in address order, each a
    list of instructions; its edges as (from, to) node names; and each
    node's place in blocks.  The graph, not the listing's labels: nvdisasm
    11.8 leaves some labels of CUDA 13's code unprinted."""
    out, name, node = {}, None, None
    for line in dot.splitlines():
        m = re.match(r'subgraph "cluster_(\S+)"', line)
        if m:
            name = m.group(1)
            out[name] = ([], [], {})
            continue
        if name is None:
            continue
        blocks, edges, index = out[name]
        m = re.fullmatch(r'"([^"]+)"', line.strip())
        if m:
            node = m.group(1)
            continue
        if node and line.startswith("[label="):
            index[node] = len(blocks)
            blocks.append(block_code(line))
            node = None
            continue
        m = re.match(r'"([^"]+)"\S* -> "([^"]+)"', line)
        if m:
            edges.append((m.group(1), m.group(2)))
    return out


def block_code(label):
    """The instructions of a node's label: a DOT record whose fields are
    split by | and lines by \\l, its spaces and brackets escaped."""
    body = label[len('[label="'):label.rindex('"]')].strip("{}")
    code = []
    for part in re.split(r"\\l|(?<!\\)\|", body):
        text = re.sub(r"\\(.)", r"\1", re.sub(r"^<\w+>", "", part)).strip()
        if text.endswith(";"):
            code.append(text[:-1].strip())
    return code


def opcode(text):
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def report(name, graph, min_len):
    blocks, edges, index = graph
    print("%s: %d instructions" % (name, sum(len(b) for b in blocks)))
    for a, b in edges:
        i, j = index.get(a), index.get(b)
        if i is None or j is None or j > i:
            continue
        loop = [t for block in blocks[j:i + 1] for t in block]
        if len(loop) < min_len:
            continue
        mix = collections.Counter(opcode(t) for t in loop)
        print("  loop of %d instructions: %s" % (len(loop), ", ".join("%s %d" % kv for kv in mix.most_common(10))))


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quietly, into head
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel")
    ap.add_argument("--source", help="one .cu file (default: every engine/*.cu)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--min", type=int, default=30, help="shortest loop to list (instructions)")
    a = ap.parse_args()
    if not re.fullmatch(r"sm_\d+", a.arch):
        die("--arch is sm_NN")
    nvdisasm = find_nvdisasm()
    sources = [a.source] if a.source else sorted(glob.glob(os.path.join(ROOT, "engine", "*.cu")))
    found = 0
    for source in sources:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            log = compile_cubin(source, a.arch, cubin)
            older_header(cubin, a.arch)
            r = subprocess.run([nvdisasm, "-bbcfg", cubin], capture_output=True, text=True)
            if r.returncode:
                die("nvdisasm failed: " + r.stderr.strip())
        for name, body in functions(r.stdout).items():
            if a.kernel not in name:
                continue
            found += 1
            for line in ptxas_lines(log, name):
                print(line)
            report(name, body, a.min)
    if not found:
        die("no kernel's name contains %r" % a.kernel)


if __name__ == "__main__":
    main()
