"""bench_torch.py OUTDIR - the PyTorch side of `make bench`.

Writes to OUTDIR the weight files and token inputs the C engine's benchmark
loads, so both sides run the same weights on the same tokens, then times
PyTorch (2 threads, its defaults otherwise, as a user would have it) on
them and prints one JSON object with the timings on stdout:

  classify  byte LSTM, L=2, H=512, E=256, pool last, 2 classes, batch 64,
            T=128: lstm_classify.safetensors, classify_tokens.i32
  step      the same LSTM as an lm: one generation step (embedding ->
            one LSTM step with carried (h, c) -> logits) at batch 1 and 32:
            lstm_lm.safetensors
  rra       the lm with dynamic residual attention, window 8, batch 64
            and batch 1, T=128, as the eager step loop a PyTorch user would
            write (PyTorch has no such cell): rra_lm.safetensors,
            rra_tokens.i32

Token files are raw little-endian int32 [64, 128].  Run with the Python
that has torch (Debian's /usr/bin/python3).
"""
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from export_torch import save_rrnserve, state_dict_tensors  # noqa: E402

THREADS = 2
VOCAB = 256
EMBED = 256
HIDDEN = 512
LAYERS = 2
BATCH = 64
STEPS = 128
WINDOW = 8
# Long enough for a steady mean, short enough that the whole script stays
# near a minute on a 2-core machine.
MIN_SECONDS = 5.0
STEP_SECONDS = 2.0


class Model(nn.Module):
    """The submodule names are rrnserve's tensor names (MODELS.md)."""

    def __init__(self, vocab, embed, hidden, layers, out):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, out)


def config(task, attention=None, hidden=HIDDEN, layers=LAYERS, embed=EMBED):
    c = {"task": task, "cell": "lstm", "hidden": hidden, "layers": layers,
         "bidirectional": False, "embed_dim": embed,
         "attention": attention, "tokenizer": {"type": "byte"}}
    if task == "classify":
        c["pool"] = "last"
        c["classes"] = ["neg", "pos"]
    return c


def make_model(seed, task, hidden=HIDDEN, layers=LAYERS, embed=EMBED):
    torch.manual_seed(seed)
    out = 2 if task == "classify" else VOCAB
    return Model(VOCAB, embed, hidden, layers, out).eval()


def make_queries(seed, hidden, layers):
    """W_q per layer, drawn as PyTorch draws an LSTM's weights."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)
    return [(torch.rand(hidden, hidden, generator=g) * 2 - 1) * bound
            for _ in range(layers)]


def save_tokens(path, seed, shape):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=shape)
    tokens.astype("<i4").tofile(path)
    return torch.from_numpy(tokens.astype(np.int64))


def timed(fn, min_seconds, min_iters=1):
    """Mean seconds per call of fn, after one warm-up call."""
    fn()
    n = 0
    start = time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and n >= min_iters:
            return elapsed / n


def lstm_gflop(batch, steps, embed, hidden, layers):
    """2*B*T*4H*(in+H) per layer: the gate matmuls, the rest ignored."""
    total = 0
    for k in range(layers):
        width = embed if k == 0 else hidden
        total += 2 * batch * steps * 4 * hidden * (width + hidden)
    return total / 1e9


def classify_forward(model, tokens):
    out, _ = model.rnn(model.embedding(tokens))
    return torch.softmax(model.head(out[:, -1]), dim=-1)


def rra_forward(model, queries, tokens, window):
    """The eager loop: per layer, per step, an LSTM step whose cell also
    takes sum_j a_j h_{t-1-j}, a = softmax(q . h_{t-1-j} / sqrt(H)),
    q = W_q h_{t-1}.  Returns lm logits [B, T, V]."""
    batch, steps = tokens.shape
    x = model.embedding(tokens)
    for k, w_q in enumerate(queries):
        w_ih = getattr(model.rnn, "weight_ih_l%d" % k)
        w_hh = getattr(model.rnn, "weight_hh_l%d" % k)
        bias = getattr(model.rnn, "bias_ih_l%d" % k) + getattr(model.rnn, "bias_hh_l%d" % k)
        hidden = w_hh.shape[1]
        x_proj = torch.addmm(bias, x.reshape(batch * steps, -1), w_ih.t()).view(batch, steps, -1)
        # hist[:, s + window] = h_s; the zeros before the start stay in
        # the softmax as MODELS.md asks.
        hist = x.new_zeros(batch, steps + window + 1, hidden)
        c = x.new_zeros(batch, hidden)
        scale = 1.0 / math.sqrt(hidden)
        for t in range(1, steps + 1):
            h_prev = hist[:, t - 1 + window]
            gates = torch.addmm(x_proj[:, t - 1], h_prev, w_hh.t())
            i, f, g, o = gates.chunk(4, dim=1)
            past = hist[:, t - 1:t - 1 + window]  # h_{t-1-window} .. h_{t-2}
            q = h_prev @ w_q.t()
            a = torch.softmax(torch.bmm(past, q.unsqueeze(2)).squeeze(2) * scale, dim=1)
            c = (torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                 + torch.bmm(a.unsqueeze(1), past).squeeze(1))
            hist[:, t + window] = torch.sigmoid(o) * torch.tanh(c)
        x = hist[:, window + 1:]
    return model.head(x)


def check_rra_against_reference():
    """Compare the eager loop with tests/fixtures/reference.py (float64
    numpy, written from MODELS.md) on a tiny model.  Returns True when it
    matched, None when the reference is not there."""
    path = os.path.join(ROOT, "tests", "fixtures")
    if not os.path.exists(os.path.join(path, "reference.py")):
        return None
    sys.path.insert(0, path)
    import reference

    hidden, layers, embed, window, steps = 8, 2, 6, 3, 11
    model = make_model(7, "lm", hidden, layers, embed)
    queries = make_queries(8, hidden, layers)
    ids = np.random.default_rng(9).integers(0, VOCAB, size=steps)
    with torch.inference_mode():
        got = rra_forward(model, queries, torch.from_numpy(ids)[None], window)[0].numpy()
    tensors = {k: v.double().numpy() for k, v in state_dict_tensors(model).items()}
    for k, w_q in enumerate(queries):
        tensors["rnn.attention_query_l%d" % k] = w_q.double().numpy()
    cfg = config("lm", {"window": window, "mode": "dynamic"}, hidden, layers, embed)
    want = np.array(reference.forward(cfg, tensors, [int(i) for i in ids])["logits"])
    err = float(np.max(np.abs(got - want)))
    if err > 1e-4:
        raise SystemExit("bench_torch: RRA loop differs from reference.py by %g" % err)
    return True


def blas_info():
    """What torch.__config__.show() says about BLAS and oneDNN, and which
    BLAS the process really loaded: Debian's torch says BLAS_INFO=generic
    and takes whatever libblas.so.3 points to."""
    shown = torch.__config__.show()
    parts = [m.group(0) for m in
             (re.search(r"BLAS_INFO=\w+", shown), re.search(r"MKL-DNN v[\d.]+", shown)) if m]
    with open("/proc/self/maps") as f:
        libs = {os.path.realpath(line.split()[-1]) for line in f
                if "blas" in os.path.basename(line.split()[-1])}
    return "; ".join(parts + sorted(libs))


def lstm_uses_mkldnn(model, tokens):
    """Whether nn.LSTM dispatches to a oneDNN kernel in this torch."""
    with torch.autograd.profiler.profile() as prof:
        model.rnn(model.embedding(tokens[:1, :2]))
    return any("mkldnn" in e.name for e in prof.function_events)


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("usage: bench_torch.py OUTDIR\n")
        return 2
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(THREADS)
    result = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}

    rra_checked = check_rra_against_reference()

    # (a) classify throughput.
    model = make_model(1, "classify")
    save_rrnserve(os.path.join(outdir, "lstm_classify.safetensors"),
                  state_dict_tensors(model), config("classify"))
    tokens = save_tokens(os.path.join(outdir, "classify_tokens.i32"), 2, (BATCH, STEPS))
    with torch.inference_mode():
        sec = timed(lambda: classify_forward(model, tokens), MIN_SECONDS)
        mkldnn_lstm = lstm_uses_mkldnn(model, tokens)
    result["classify_seq_per_s"] = BATCH / sec
    result["classify_gflops"] = lstm_gflop(BATCH, STEPS, EMBED, HIDDEN, LAYERS) / sec

    # (b) generation step latency.
    model = make_model(3, "lm")
    save_rrnserve(os.path.join(outdir, "lstm_lm.safetensors"),
                  state_dict_tensors(model), config("lm"))
    for batch in (1, 32):
        step_tokens = torch.from_numpy(
            np.random.default_rng(4).integers(0, VOCAB, size=(1000, batch, 1)))
        state = [None]
        pos = [0]

        def step():
            tok = step_tokens[pos[0] % len(step_tokens)]
            pos[0] += 1
            out, state[0] = model.rnn(model.embedding(tok), state[0])
            return model.head(out[:, 0])

        with torch.inference_mode():
            # Warm up past the first step, whose state starts as None.
            for _ in range(10):
                step()
            sec = timed(step, STEP_SECONDS, min_iters=100)
        result["step_ms_b%d" % batch] = sec * 1e3

    # (c) RRA full forward.
    model = make_model(5, "lm")
    queries = make_queries(6, HIDDEN, LAYERS)
    tensors = state_dict_tensors(model)
    for k, w_q in enumerate(queries):
        tensors["rnn.attention_query_l%d" % k] = w_q
    save_rrnserve(os.path.join(outdir, "rra_lm.safetensors"), tensors,
                  config("lm", {"window": WINDOW, "mode": "dynamic"}))
    tokens = save_tokens(os.path.join(outdir, "rra_tokens.i32"), 7, (BATCH, STEPS))
    with torch.inference_mode():
        sec = timed(lambda: rra_forward(model, queries, tokens, WINDOW), MIN_SECONDS)
    result["rra_seq_per_s"] = BATCH / sec
    # One sequence alone, the shape of an /attention request: here the
    # loop's per-step overhead, not the matrix products, sets the pace.
    with torch.inference_mode():
        sec = timed(lambda: rra_forward(model, queries, tokens[:1], WINDOW), STEP_SECONDS)
    result["rra1_seq_per_s"] = 1 / sec
    result["rra_checked_against_reference"] = rra_checked

    result["blas"] = blas_info()
    # Debian's torch runs matmuls on OpenBLAS's own thread pool next to
    # torch's OpenMP one; how OpenMP threads wait decides how much of the
    # two cores OpenBLAS gets, so record it with the numbers.
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    result["mkldnn_enabled"] = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    result["lstm_uses_mkldnn"] = mkldnn_lstm
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
