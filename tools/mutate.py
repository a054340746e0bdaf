#!/usr/bin/env python3
"""mutate.py FILE TEST[,TEST...] - mutation checks of one source file: each
comparison (< <= > >= == !=) and each && / || in FILE's code is flipped to
its neighbour, one at a time, the build without CUDA made again and the
test binaries named run; a mutant no test fails shows a test missing (or a
change that changes nothing: ties, boundaries no input reaches, memory
errors only the sanitizers see).

It works in a git worktree of HEAD of its own (under /tmp), so what is
uncommitted here is neither tested nor touched; a test that runs past
--timeout is killed with everything it started.  Prints one line a mutant:

    LINE: OLD->NEW killed by TEST | survived | timeout in TEST | nobuild | same-code | the line

then the counts.  same-code: the mutant compiled to the very object file
HEAD's does (a line under an #ifdef this build leaves out, or a change
the compiler proves makes no difference), so no test is run for it.

Examples:

    tools/mutate.py server/auth.c test_server
    tools/mutate.py engine/safetensors.c test_safetensors,test_model_load --sample 40
    tools/mutate.py server/generate.c test_server --lines 65,75
    tools/mutate.py engine/cuda_fused.cu test_fixtures,test_engine --emu
    tools/mutate.py server/request_id.c test_server --filter test_request_ids
    tools/mutate.py server/serve.c test_server --filter 'test_sig*,test_bad_command_lines'

--filter runs only the tests cmocka patterns match (every test binary
reads RRN_TEST_FILTER; several patterns, comma-separated, are a run of
each binary for each pattern that matches some test of it; BINARY:PATTERN
is for that binary alone, and a binary without a pattern runs whole): a
file that only some tests of a long binary such as test_server reach is
judged in seconds a mutant, not minutes.

    tools/mutate.py cli/cmd_run.c test_cli,test_server --filter 'test_server:test_cli_*'

--emu builds on the CUDA emulator (tests/cuda_emu, with ASan and UBSan, as
`make test-cuda-emu`) and runs only the tests' CUDA variants: the way to
check the CUDA backend's kernels and the host code only it takes (lanes,
graphs, waves) on a machine without a GPU.  The sanitizers are what make
a kernel's read past its buffer or misaligned 16-byte load fail here, as
it would fault on a GPU.  The tests must be among the Makefile's
EMU_TESTS.
"""
import argparse
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

FLIPS = [(" < ", " <= "), (" <= ", " < "), (" > ", " >= "), (" >= ", " > "),
         (" == ", " != "), (" != ", " == "), (" && ", " || "), (" || ", " && ")]


def sites(text):
    """(line index, column, old, new) of each flip in code, not in comments,
    preprocessor lines, asserts or messages."""
    out, in_comment = [], False
    for i, line in enumerate(text.split("\n")):
        s = line.strip()
        if in_comment:
            in_comment = "*/" not in s
            continue
        if s.startswith("/*"):
            in_comment = "*/" not in s
            continue
        if s.startswith(("*", "//", "#")) or any(w in s for w in ("assert", "snprintf", "log_msg")):
            continue
        code = line.split("/*")[0]
        for old, new in FLIPS:
            out += [(i, m.start(), old, new) for m in re.finditer(re.escape(old), code)]
    return out


def run(cmd, cwd, timeout):
    """The command's exit status, or None when it ran past timeout (then it
    and every process it started are killed)."""
    p = subprocess.Popen(cmd, shell=True, cwd=cwd, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return None
    except BaseException:
        # A kill of this script (SIGTERM) takes the command with it: in a
        # session of its own, it would run on over a removed worktree.
        os.killpg(p.pid, signal.SIGKILL)
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("tests", help="test binaries, comma-separated (test_server,test_faults)")
    ap.add_argument("--lines", help="only the mutants of these lines (1-based, comma-separated)")
    ap.add_argument("--sample", type=int, help="only this many mutants, drawn with a fixed seed")
    ap.add_argument("--timeout", type=int, default=120, help="seconds a test binary may run (default 120)")
    ap.add_argument("--emu", action="store_true", help="the CUDA variants of the tests, on the emulator")
    ap.add_argument("--filter", help="only the tests these cmocka patterns match, comma-separated "
                    "(RRN_TEST_FILTER; with --emu in place of '*cuda*')")
    a = ap.parse_args()
    # A kill (SIGTERM) unwinds as an exit does, so the worktree goes too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("mutate.py: terminated"))
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    tests = a.tests.split(",")
    work = tempfile.mkdtemp(prefix="rrn_mutate_")
    tree = os.path.join(work, "tree")
    subprocess.run(["git", "-C", root, "worktree", "add", "-q", "--detach", tree, "HEAD"], check=True)
    try:
        path = os.path.join(tree, a.file)
        orig = open(path).read()
        lines = orig.split("\n")
        todo = sites(orig)
        if a.lines:
            want = {int(x) for x in a.lines.split(",")}
            todo = [t for t in todo if t[0] + 1 in want]
        if a.sample and a.sample < len(todo):
            random.Random(1).shuffle(todo)
            todo = sorted(todo[:a.sample])
        out, flags, env, patterns = "build/cpu", "CUDA=0", "", a.filter
        if a.emu:
            out, flags = "build/emu", ""
            env, patterns = "ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 ", a.filter or "*cuda*"
        # The runs: each test binary once a pattern of its own (BINARY:PATTERN)
        # or for all (PATTERN), or once whole when it has none.
        runs = []
        for t in tests:
            mine = [p.split(":", 1)[-1] for p in (patterns.split(",") if patterns else [])
                    if ":" not in p or p.split(":", 1)[0] == t]
            runs += [(t, p) for p in mine or [None]]
        build = "make -j%d %s %s/rrnserve %s" % (os.cpu_count() or 1, flags, out,
                                                 " ".join("%s/tests/%s" % (out, t) for t in tests))
        if run(build, tree, 1800) != 0:
            sys.exit("mutate.py: HEAD does not build: %s" % build)
        # The mutated file's object, compared with HEAD's after each build.
        stem, ext = os.path.splitext(a.file)
        obj = os.path.join(tree, out, stem + (".cu.o" if ext == ".cu" else ".o"))
        if not os.path.exists(obj):
            sys.exit("mutate.py: this build makes no %s (a .cu file wants --emu)" % os.path.relpath(obj, tree))
        head_obj = open(obj, "rb").read()

        def cmd_of(t, pattern):
            where = "RRN_TEST_FILTER=%s " % shlex.quote(pattern) if pattern else ""
            return "%s%sRRN_BIN=%s/rrnserve %s/tests/%s" % (env, where, out, out, t)

        # HEAD must pass.  A pattern that matches no test of a binary is
        # dropped for it; a binary left with none would have every mutant
        # survive, so that stops the run.
        kept = []
        for t, pattern in runs:
            p = subprocess.run(cmd_of(t, pattern), shell=True, cwd=tree, capture_output=True, text=True,
                               timeout=a.timeout)
            if p.returncode != 0:
                sys.exit("mutate.py: at HEAD %s %s fails:\n%s" % (t, pattern or "", p.stdout[-2000:]))
            if not re.search(r"^\[=+\] 0 test\(s\) run", p.stdout, re.M):
                kept.append((t, pattern))
        idle = [t for t in tests if t not in {k[0] for k in kept}]
        if idle:
            sys.exit("mutate.py: no test of %s matches %s" % (", ".join(idle), patterns))
        runs = kept
        print("%s: %d mutants, tests %s" % (a.file, len(todo), ", ".join(tests)), flush=True)
        counts = {}
        for i, col, old, new in todo:
            mutated = lines[:]
            mutated[i] = lines[i][:col] + new + lines[i][col + len(old):]
            open(path, "w").write("\n".join(mutated))
            verdict = "nobuild" if run(build, tree, 600) != 0 else "survived"
            if verdict == "survived" and open(obj, "rb").read() == head_obj:
                verdict = "same-code"
            for t, pattern in runs if verdict == "survived" else []:
                rc = run(cmd_of(t, pattern), tree, a.timeout)
                name = t + (" " + pattern if pattern and a.filter else "")
                if rc is None:
                    verdict = "timeout in " + name
                elif rc != 0:
                    verdict = "killed by " + name
                if verdict != "survived":
                    break
            kind = verdict.split(" ")[0]
            counts[kind] = counts.get(kind, 0) + 1
            print("%d: %s->%s %s | %s" % (i + 1, old.strip(), new.strip(), verdict, lines[i].strip()), flush=True)
        open(path, "w").write(orig)
        print(", ".join("%d %s" % (n, k) for k, n in sorted(counts.items())))
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
