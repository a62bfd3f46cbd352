"""Would running the optimizer on a second stream, layer by layer, hide it behind the next step's
forward? Times TinyLlama's forward matrix products (22 layers, N rows) and a fused AdamW over the
same 1.1B float32 parameters (torch.optim.AdamW(fused=True), one optimizer per layer, the embedding
and the output projection), serially and overlapped: the AdamW on its own stream, each layer's
products waiting only for that layer's update (the dependency a real overlap would have), once with
both streams at default priority and once with the products on a high-priority stream.

    python3 overlap_probe.py [rows]     # on the GPU machine; default 3424
"""
import torch, sys
torch.manual_seed(0)
H, KV, F, L = 2048, 256, 5632, 22
n = int(sys.argv[1]) if len(sys.argv) > 1 else 3424
dev = "cuda"
x = torch.randn(n, H, device=dev, dtype=torch.bfloat16)
hmid = torch.randn(n, F, device=dev, dtype=torch.bfloat16)
layers = []
groups = []
for i in range(L):
    ws = [torch.randn(H + 2 * KV, H, device=dev) * .02, torch.randn(H, H, device=dev) * .02,
          torch.randn(F, H, device=dev) * .02, torch.randn(F, H, device=dev) * .02, torch.randn(H, F, device=dev) * .02]
    ps = [torch.nn.Parameter(w) for w in ws]
    for p in ps:
        p.grad = torch.randn_like(p, dtype=torch.bfloat16).float() * 1e-3
    groups.append(ps)
    layers.append([w.bfloat16() for w in ws])
emb = [torch.nn.Parameter(torch.randn(32000, H, device=dev) * .02) for _ in range(2)]
for p in emb:
    p.grad = torch.randn_like(p) * 1e-3
groups = [emb[:1]] + groups + [emb[1:]]
opts = [torch.optim.AdamW(g, lr=1e-5, fused=True) for g in groups]
for o in opts:
    o.step()

def fwd(waits=None):
    for i, (wqkv, wo, wg, wu, wd) in enumerate(layers):
        if waits is not None:
            torch.cuda.current_stream().wait_event(waits[i + 1])
        a = x @ wqkv.t(); b = x @ wo.t(); g = x @ wg.t(); u = x @ wu.t(); d = hmid @ wd.t()

def adam(events=None):
    for i, o in enumerate(opts):
        o.step()
        if events is not None:
            events[i].record()

def timed(fn, iters=10):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / iters

s2 = torch.cuda.Stream()
def overlapped(fwd_stream=None):
    """AdamW layer by layer on s2; the forward on `fwd_stream` (default: the current stream), each
    layer waiting for its own update."""
    start = torch.cuda.Event(); start.record()
    events = [torch.cuda.Event() for _ in opts]
    with torch.cuda.stream(s2):
        s2.wait_event(start)
        adam(events=events)
    if fwd_stream is None:
        fwd(waits=events)
    else:
        fwd_stream.wait_event(start)
        with torch.cuda.stream(fwd_stream):
            fwd(waits=events)
        torch.cuda.current_stream().wait_stream(fwd_stream)
    torch.cuda.current_stream().wait_event(events[-1])

tf = timed(fwd); ta = timed(adam)
ts = timed(lambda: (adam(), fwd()))
to = timed(overlapped)
print(f"rows {n}: forward products {tf:.2f} ms, AdamW {ta:.2f} ms, serial {ts:.2f} ms, overlapped {to:.2f} ms "
      f"(hidden {(ts - to) / ta * 100:.0f}% of AdamW)", flush=True)
hi = torch.cuda.Stream(priority=-1)
tp = timed(lambda: overlapped(hi))
print(f"rows {n}: overlapped with the forward on a high-priority stream {tp:.2f} ms (hidden {(ts - tp) / ta * 100:.0f}%)", flush=True)
