"""Which XLA fusions the memory-bound kernels compile to on a GPU, against plain jax.jit versions.

    python3 benchmarks/probe_bw.py OUTDIR   (writes probe.json and the optimized HLO of each kernel)

Times here are host-pipelined (20 calls, one block): at tens of microseconds they include
JAX dispatch, so only the fusion counts and the ratios within one run mean anything;
benchmarks/gpu.py is the measurement of record.
"""
import time, statistics, re, sys, json
import jax, jax.numpy as jnp, numpy as np
import kernels
from kernels.rms_norm import torch_rsqrt
def timeit(fn, args, reps=20, trials=5):
    fn(*args); jax.block_until_ready(fn(*args))
    ts=[]
    for _ in range(trials):
        t0=time.perf_counter(); outs=[fn(*args) for _ in range(reps)]; jax.block_until_ready(outs[-1]); ts.append((time.perf_counter()-t0)/reps)
    return statistics.median(ts)
def nfus(fn, args):
    txt=fn.lower(*args).compile().as_text()
    return len(re.findall(r"^\s*ROOT.*fusion|^\s*\S+ = \S+ fusion\(", txt, re.M)), txt
rng=np.random.default_rng(0)
# copy ceiling on 256 MB
big=jnp.asarray(rng.standard_normal((64*1024*1024,)), jnp.float32)
cp=jax.jit(lambda a: a+1.0); tc=timeit(cp,(big,)); copy_bw=2*big.nbytes/tc; print("copy TB/s", copy_bw/1e12)
T,D=4096,3584
xs=[jnp.asarray(rng.standard_normal((T,D)), jnp.bfloat16) for _ in range(4)]
w=jnp.asarray(rng.standard_normal((D,))*0.1+1, jnp.bfloat16)
nb=2*T*D*2+D*2
def rms_plain(x,w):
    xf=x.astype(jnp.float32); v=jnp.mean(xf*xf,-1,keepdims=True); return w*(xf*jax.lax.rsqrt(v+1e-6)).astype(jnp.bfloat16)
def rms_noround(x,w):
    xf=x.astype(jnp.float32); v=jnp.mean(jnp.square(xf),-1,keepdims=True); y=xf*torch_rsqrt(v+jnp.float32(1e-6)); return w*y.astype(jnp.bfloat16)
variants={"kernels.rms_norm": lambda x,w: kernels.rms_norm(x,w,eps=1e-6), "plain": rms_plain, "no_round_to": rms_noround}
res={"copy_TBps": copy_bw/1e12}
for name,f in variants.items():
    j=jax.jit(f)
    t=statistics.median([timeit(j,(x,w)) for x in xs[:2]])
    n,txt=nfus(j,(xs[0],w))
    out=j(xs[0],w); ref=jax.jit(variants["kernels.rms_norm"])(xs[0],w)
    res["rms_"+name]={"us":t*1e6,"bw_frac":nb/t/copy_bw,"fusions":n,"bit_equal_to_kernel":float(jnp.mean((out==ref).astype(jnp.float32)))}
    print("rms", name, res["rms_"+name], flush=True)
    if name=="kernels.rms_norm": open(sys.argv[1]+"/rms_hlo.txt","w").write(txt)
# rope
N,K,H=28,4,128
q=jnp.asarray(rng.standard_normal((1,T,N,H)), jnp.bfloat16); k=jnp.asarray(rng.standard_normal((1,T,K,H)), jnp.bfloat16)
ang=np.arange(T)[:,None]*(10000.0**(-np.arange(0,H,2)/H))[None]; ang=np.concatenate([ang,ang],-1)
cos=jnp.asarray(np.cos(ang)[None], jnp.bfloat16); sin=jnp.asarray(np.sin(ang)[None], jnp.bfloat16)
nbr=2*(T*N*H+T*K*H)*2+2*T*H*2
def rope_plain(x,c,s):
    x1,x2=x[...,:H//2],x[...,H//2:]; rot=jnp.concatenate([-x2,x1],-1); c=c[:,:,None]; s=s[:,:,None]
    return (x*c + rot*s).astype(x.dtype)
rv={"kernels.apply_rope": lambda q,k,c,s:(kernels.apply_rope(q,c,s),kernels.apply_rope(k,c,s)),
    "plain": lambda q,k,c,s:(rope_plain(q,c,s),rope_plain(k,c,s))}
for name,f in rv.items():
    j=jax.jit(f); t=timeit(j,(q,k,cos,sin)); n,txt=nfus(j,(q,k,cos,sin))
    res["rope_"+name]={"us":t*1e6,"bw_frac":nbr/t/copy_bw,"fusions":n}
    print("rope", name, res["rope_"+name], flush=True)
    if name=="kernels.apply_rope": open(sys.argv[1]+"/rope_hlo.txt","w").write(txt)
# decode
S=32768
qd=jnp.asarray(rng.standard_normal((1,1,N,H)), jnp.bfloat16); kc=jnp.asarray(rng.standard_normal((1,S,K,H)), jnp.bfloat16); vc=jnp.asarray(rng.standard_normal((1,S,K,H)), jnp.bfloat16)
nbd=2*S*K*H*2
for name,f in {"hf":lambda q,k,v: kernels.gqa_attention(q,k,v), "fp32_logits":lambda q,k,v: kernels.gqa_attention(q,k,v,recipe="fp32_logits"),
               "jax.nn xla": lambda q,k,v: jax.nn.dot_product_attention(q,k,v)}.items():
    j=jax.jit(f); t=timeit(j,(qd,kc,vc)); n,txt=nfus(j,(qd,kc,vc))
    res["decode_"+name]={"us":t*1e6,"bw_frac":nbd/t/copy_bw,"fusions":n}
    print("decode", name, res["decode_"+name], flush=True)
    if name=="hf": open(sys.argv[1]+"/decode_hlo.txt","w").write(txt)
json.dump(res, open(sys.argv[1]+"/probe.json","w"), indent=1)
