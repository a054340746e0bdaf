"""bench_torch.py OUTDIR [cpu|cuda] - the PyTorch side of `make bench`
(cpu, the default) and `make bench-gpu` (cuda).

Writes to OUTDIR the weight files and token inputs the C engine's benchmark
loads, so both sides run the same weights on the same tokens, then times
PyTorch (on the CPU 2 threads, its defaults otherwise, as a user would have
it; on the GPU cuDNN's LSTM and GRU) on them and prints one JSON object
with the timings on stdout:

  classify  byte LSTM, L=2, H=512, E=256, pool last, 2 classes, batch 64,
            T=128: lstm_classify.safetensors, classify_tokens.i32
  classify_var  the same, but each sequence of a batch has its own length,
            16 to 128, as a server's batches do: 64 batches of them in
            turn, each with lengths of its own (classify_lengths.i32:
            int32 [64, 64], lengths of classify_tokens.i32's rows), PyTorch
            running them packed (pack_padded_sequence)
  step      the same LSTM as an lm: one generation step (embedding ->
            one LSTM step with carried (h, c) -> logits) at batch 1 and 32:
            lstm_lm.safetensors
  rra       the lm with dynamic residual attention, window 8, batch 64
            and batch 1, T=128, as the eager step loop a PyTorch user would
            write (PyTorch has no such cell): rra_lm.safetensors,
            rra_tokens.i32
  train     training steps of the step workload's lm (lstm_lm.safetensors)
            on the first 32 rows of rra_tokens.i32, each predicting its
            127 next tokens: forward, backward, gradients clipped to norm
            1, Adam (lr 1e-3); tokens per second, and the first step's mean
            loss for the engine to match (lm_train_loss.f32)

and on the GPU also, as issue 5 asks:

  gru       the classify workload with a GRU: gru_classify.safetensors
  step      at batch 8 and 64 too
  skip      an lm with temporal skip period 2 and 2 recurrent matrices
            (version D), batch 64 and 1, T=128, as an eager step loop:
            skip_lm.safetensors (rra_tokens.i32 as input)

On the GPU, cuDNN's classify and step figures come twice: in FP32 (keys as
above) and in TF32 (the same keys ending in _tf32).  PyTorch lets cuDNN
round FP32 operands to TF32 by default (torch.backends.cudnn.allow_tf32),
so its default figures are the TF32 ones; the engine is compared with each
in its own precision (bench_engine.c times both).  The eager loops run in
FP32, PyTorch's default for matmul.

Token files are raw little-endian int32 [64, 128].  Beside them, the
outputs of the work in FP32 for the engine to match: the classifiers'
probabilities (lstm_classify_probs.f32, gru_classify_probs.f32: [64, 2])
and the lms' logits (rra_logits.f32, skip_logits.f32: [64, 128, 256]), raw
little-endian float32.  Run with the Python
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
# Windows of a training step.
TRAIN_BATCH = 32
# Batches of the classify_var workload, each with its own lengths.
VAR_BATCHES = 64
# Long enough for a steady mean, short enough that the whole script stays
# near a minute on a 2-core machine.
MIN_SECONDS = 5.0
STEP_SECONDS = 2.0


class Model(nn.Module):
    """The submodule names are rrnserve's tensor names (MODELS.md)."""

    def __init__(self, vocab, embed, hidden, layers, out, cell="lstm"):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, out)


def config(task, attention=None, hidden=HIDDEN, layers=LAYERS, embed=EMBED, cell="lstm", skip=None):
    c = {"task": task, "cell": cell, "hidden": hidden, "layers": layers,
         "bidirectional": False, "embed_dim": embed,
         "attention": attention, "tokenizer": {"type": "byte"}}
    if skip:
        c["skip"] = skip
    if task == "classify":
        c["pool"] = "last"
        c["classes"] = ["neg", "pos"]
    return c


def make_model(seed, task, hidden=HIDDEN, layers=LAYERS, embed=EMBED, cell="lstm"):
    torch.manual_seed(seed)
    out = 2 if task == "classify" else VOCAB
    return Model(VOCAB, embed, hidden, layers, out, cell).eval()


def make_queries(seed, hidden, layers, rows=None):
    """One extra matrix per layer ([rows or hidden, hidden]: W_q, or a
    skip model's second recurrent matrix), drawn as PyTorch draws an LSTM's
    weights."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)
    return [(torch.rand(rows or hidden, hidden, generator=g) * 2 - 1) * bound
            for _ in range(layers)]


def save_tokens(path, seed, shape):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=shape)
    tokens.astype("<i4").tofile(path)
    return torch.from_numpy(tokens.astype(np.int64))


def timed(fn, min_seconds, min_iters=1):
    """Mean seconds per call of fn, after one warm-up call; on the GPU
    each call waits for the device to finish."""
    def call():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    call()
    n = 0
    start = time.perf_counter()
    while True:
        call()
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


def classify_var_forward(model, tokens, lengths):
    """The classifier over sequences of their own lengths (int64 on the
    CPU, as pack_padded_sequence wants them): the last layer's final state
    of each is its output at its last token."""
    packed = nn.utils.rnn.pack_padded_sequence(model.embedding(tokens), lengths, batch_first=True,
                                               enforce_sorted=False)
    _, state = model.rnn(packed)
    h = state[0] if isinstance(state, tuple) else state
    return torch.softmax(model.head(h[-1]), dim=-1)


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


def skip_forward(model, extra_hh, tokens, period):
    """The eager loop of an LSTM with temporal skip: step t uses recurrent
    matrix (t-1) mod M (weight_hh_l<k> first, then extra_hh[k]) and, when
    t mod period == 0, adds h_{t-period} to h_t.  Returns lm logits."""
    batch, steps = tokens.shape
    x = model.embedding(tokens)
    for k, extra in enumerate(extra_hh):
        w_ih = getattr(model.rnn, "weight_ih_l%d" % k)
        mats = [getattr(model.rnn, "weight_hh_l%d" % k)] + extra
        bias = getattr(model.rnn, "bias_ih_l%d" % k) + getattr(model.rnn, "bias_hh_l%d" % k)
        x_proj = torch.addmm(bias, x.reshape(batch * steps, -1), w_ih.t()).view(batch, steps, -1)
        h = x.new_zeros(batch, mats[0].shape[1])
        c = torch.zeros_like(h)
        hs = []
        for t in range(1, steps + 1):
            gates = torch.addmm(x_proj[:, t - 1], h, mats[(t - 1) % len(mats)].t())
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if period > 1 and t % period == 0 and t > period:
                h = h + hs[t - period - 1]
            hs.append(h)
        x = torch.stack(hs, 1)
    return model.head(x)


def check_against_reference(kind):
    """Compare an eager loop (kind "rra" or "skip") with
    tests/fixtures/reference.py (float64 numpy, written from MODELS.md) on a
    tiny model.  Returns True when it matched, None when the reference is
    not there."""
    path = os.path.join(ROOT, "tests", "fixtures")
    if not os.path.exists(os.path.join(path, "reference.py")):
        return None
    sys.path.insert(0, path)
    import reference

    hidden, layers, embed, window, steps = 8, 2, 6, 3, 11
    model = make_model(7, "lm", hidden, layers, embed)
    extra = make_queries(8, hidden, layers, 4 * hidden if kind == "skip" else None)
    ids = np.random.default_rng(9).integers(0, VOCAB, size=steps)
    tokens = torch.from_numpy(ids)[None]
    tensors = {k: v.double().numpy() for k, v in state_dict_tensors(model).items()}
    with torch.inference_mode():
        if kind == "skip":
            got = skip_forward(model, [[w] for w in extra], tokens, 2)[0].numpy()
        else:
            got = rra_forward(model, extra, tokens, window)[0].numpy()
    for k, w in enumerate(extra):
        name = "rnn.weight_hh_l%d_m1" if kind == "skip" else "rnn.attention_query_l%d"
        tensors[name % k] = w.double().numpy()
    if kind == "skip":
        cfg = config("lm", None, hidden, layers, embed, skip={"period": 2, "matrices": 2})
    else:
        cfg = config("lm", {"window": window, "mode": "dynamic"}, hidden, layers, embed)
    want = np.array(reference.forward(cfg, tensors, [int(i) for i in ids])["logits"])
    err = float(np.max(np.abs(got - want)))
    if err > 1e-4:
        raise SystemExit("bench_torch: the %s loop differs from reference.py by %g" % (kind, err))
    return True


def time_training(result, outdir, tokens, dev):
    """(d) Training throughput: the lm from its saved weights (seed 3, as
    lstm_lm.safetensors), whole windows from the zero state, the mean
    cross-entropy over every next token."""
    model = make_model(3, "lm").to(dev).train()
    inputs, targets = tokens[:TRAIN_BATCH, :-1], tokens[:TRAIN_BATCH, 1:].reshape(-1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        out, _ = model.rnn(model.embedding(inputs))
        loss = nn.functional.cross_entropy(model.head(out).reshape(-1, VOCAB), targets)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    save_reference(outdir, "lm_train_loss.f32", step())
    sec = timed(step, MIN_SECONDS)
    result["train_tok_per_s"] = inputs.numel() / sec


def time_cudnn(result, suffix, classifiers, lm, dev, gpu):
    """(a) classify throughput of each (cell, model, tokens, lengths), the
    LSTM's also over varied lengths, and (b) the lm's generation step
    latency, into result under keys ending in suffix."""
    for cell, model, tokens, lengths in classifiers:
        with torch.inference_mode():
            sec = timed(lambda: classify_forward(model, tokens), MIN_SECONDS)
        key = "classify" if cell == "lstm" else "gru_classify"
        result[key + "_seq_per_s" + suffix] = BATCH / sec
        if cell == "lstm" and not suffix:
            result["classify_gflops"] = lstm_gflop(BATCH, STEPS, EMBED, HIDDEN, LAYERS) / sec
            if not gpu:
                with torch.inference_mode():
                    result["lstm_uses_mkldnn"] = lstm_uses_mkldnn(model, tokens)
        if cell == "lstm":
            turn = [0]

            def next_batch():
                b = turn[0] % VAR_BATCHES
                turn[0] += 1
                return classify_var_forward(model, tokens, lengths[b])

            with torch.inference_mode():
                sec = timed(next_batch, MIN_SECONDS, min_iters=VAR_BATCHES)
            result["classify_var_seq_per_s" + suffix] = BATCH / sec
    for batch in (1, 8, 32, 64) if gpu else (1, 32):
        step_tokens = torch.from_numpy(
            np.random.default_rng(4).integers(0, VOCAB, size=(1000, batch, 1))).to(dev)
        state = [None]
        pos = [0]

        def step():
            tok = step_tokens[pos[0] % len(step_tokens)]
            pos[0] += 1
            out, state[0] = lm.rnn(lm.embedding(tok), state[0])
            return lm.head(out[:, 0])

        with torch.inference_mode():
            # Warm up past the first step, whose state starts as None.
            for _ in range(10):
                step()
            sec = timed(step, STEP_SECONDS, min_iters=100)
        result["step_ms_b%d%s" % (batch, suffix)] = sec * 1e3


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


def save_reference(outdir, name, out):
    """What the engine must give for the same work, as raw little-endian
    float32 (bench_engine.c reports its largest difference from it)."""
    out.detach().float().cpu().numpy().astype("<f4").tofile(os.path.join(outdir, name))


def save(outdir, name, model, cfg, extra=None):
    """Write the weight file the engine loads (extra: name -> tensor)."""
    tensors = state_dict_tensors(model)
    tensors.update(extra or {})
    save_rrnserve(os.path.join(outdir, name), tensors, cfg)


def main():
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in ("cpu", "cuda")):
        sys.stderr.write("usage: bench_torch.py OUTDIR [cpu|cuda]\n")
        return 2
    outdir = sys.argv[1]
    gpu = len(sys.argv) == 3 and sys.argv[2] == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.stderr.write("bench_torch.py: torch sees no CUDA GPU\n")
        return 1
    dev = torch.device("cuda" if gpu else "cpu")
    os.makedirs(outdir, exist_ok=True)
    result = {"torch_version": torch.__version__}
    if gpu:
        result["device"] = torch.cuda.get_device_name(0)
        result["cudnn"] = torch.backends.cudnn.version()
    else:
        torch.set_num_threads(THREADS)
        result["threads"] = torch.get_num_threads()

    rra_checked = check_against_reference("rra")

    classifiers = []
    for cell in ("lstm", "gru") if gpu else ("lstm",):
        model = make_model(1, "classify", cell=cell)
        save(outdir, "%s_classify.safetensors" % cell, model, config("classify", cell=cell))
        tokens = save_tokens(os.path.join(outdir, "classify_tokens.i32"), 2, (BATCH, STEPS))
        lengths = np.random.default_rng(12).integers(16, STEPS + 1, size=(VAR_BATCHES, BATCH))
        lengths.astype("<i4").tofile(os.path.join(outdir, "classify_lengths.i32"))
        classifiers.append((cell, model.to(dev), tokens.to(dev), torch.from_numpy(lengths)))
    lm = make_model(3, "lm")
    save(outdir, "lstm_lm.safetensors", lm, config("lm"))
    lm = lm.to(dev)
    if gpu:
        result["cudnn_allow_tf32_default"] = torch.backends.cudnn.allow_tf32
        result["matmul_allow_tf32_default"] = torch.backends.cuda.matmul.allow_tf32
    for suffix, tf32 in (("", False), ("_tf32", True)) if gpu else (("", None),):
        if gpu:
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
        time_cudnn(result, suffix, classifiers, lm, dev, gpu)
    if gpu:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        for cell, model, tokens, _ in classifiers:
            save_reference(outdir, "%s_classify_probs.f32" % cell, classify_forward(model, tokens))

    # (c) RRA full forward, and on the GPU the skip model's.
    tokens = save_tokens(os.path.join(outdir, "rra_tokens.i32"), 7, (BATCH, STEPS)).to(dev)
    model = make_model(5, "lm")
    queries = make_queries(6, HIDDEN, LAYERS)
    save(outdir, "rra_lm.safetensors", model, config("lm", {"window": WINDOW, "mode": "dynamic"}),
         {"rnn.attention_query_l%d" % k: w for k, w in enumerate(queries)})
    model, queries = model.to(dev), [w.to(dev) for w in queries]
    loops = [("rra", lambda t: rra_forward(model, queries, t, WINDOW))]
    if gpu:
        skip_model = make_model(10, "lm")
        second = make_queries(11, HIDDEN, LAYERS, 4 * HIDDEN)
        save(outdir, "skip_lm.safetensors", skip_model, config("lm", skip={"period": 2, "matrices": 2}),
             {"rnn.weight_hh_l%d_m1" % k: w for k, w in enumerate(second)})
        skip_model, second = skip_model.to(dev), [[w.to(dev)] for w in second]
        loops.append(("skip", lambda t: skip_forward(skip_model, second, t, 2)))
        result["skip_checked_against_reference"] = check_against_reference("skip")
    for name, run in loops:
        with torch.inference_mode():
            save_reference(outdir, name + "_logits.f32", run(tokens))
            sec = timed(lambda: run(tokens), MIN_SECONDS)
            result[name + "_seq_per_s"] = BATCH / sec
            # One sequence alone, the shape of an /attention request: here
            # the loop's per-step overhead, not the matrix products, sets
            # the pace.
            sec = timed(lambda: run(tokens[:1]), STEP_SECONDS)
            result[name + "1_seq_per_s"] = 1 / sec
    result["rra_checked_against_reference"] = rra_checked
    time_training(result, outdir, tokens, dev)

    if not gpu:
        result["blas"] = blas_info()
        # Debian's torch runs matmuls on OpenBLAS's own thread pool next to
        # torch's OpenMP one; how OpenMP threads wait decides how much of
        # the two cores OpenBLAS gets, so record it with the numbers.
        result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
        result["mkldnn_enabled"] = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
