#!/usr/bin/env python3
"""Reference-engine benchmark for `silk bench inference`.

Measures, on this machine and for one GGUF file, what a reference engine does:
prefill tokens/s, decode tokens/s per batch size, time to first token and peak
resident memory, and prints one JSON object on stdout.

Engines:
  llama-cpp     llama.cpp through llama-cpp-python (the venv made by
                setup-llama.sh). Batch 1 uses the high-level `Llama.eval`;
                batch > 1 drives llama.cpp's batch API (one sequence per
                request, one `llama_decode` per step for the whole batch),
                like llama.cpp's own batched-bench.
  transformers  transformers reading the same GGUF (`gguf_file=`), which
                dequantises the weights to float32, or a Hugging Face
                directory (`--hf-dir`, in `--dtype`, on `--device`), batched by
                padding-free equal-length prompts, in PyTorch's eager mode
                (no torch.compile; the loop `generate` runs, timed in its
                two phases) (the venv made by setup.sh).
  auto          (default) llama-cpp if `llama_cpp` imports, else transformers.

Each (engine, batch size) runs in a fresh child process, so `peak_rss_bytes`
is that configuration's own high-water mark (ru_maxrss of the child).

Definitions (use the same ones on the silk side):
  prefill_tokens_per_s  batch * prompt_tokens / (time of the prompt forward)
  ttft_s                time from submitting the prompt to having the first
                        generated token (prefill + picking the argmax)
  decode_tokens_per_s   batch * gen_tokens / (time of gen_tokens single-token
                        steps after the prompt); aggregate over the batch
  per_sequence_decode_tokens_per_s = decode_tokens_per_s / batch
Greedy decoding, no EOS stopping. The prompt is the first prompt_tokens tokens
of a fixed English text (repeated as needed), tokenised by the engine itself.

Example:
    .venv-llama/bin/python inference/reference/bench_reference.py \
        --gguf ~/.silk/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 1,8,32 --prompt-tokens 128 --gen-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, there was a little robot "
    "who lived in a small house at the edge of a forest. Every morning the robot woke up, opened "
    "the window, and said hello to the birds in the trees. The birds sang back, and the robot "
    "wrote their songs down in a notebook with a blue pencil. "
)


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def prompt_ids(tokenize, n: int, bos: int | None) -> list[int]:
    text = PROMPT_TEXT
    ids = tokenize(text)
    while len(ids) < n + 1:
        text += PROMPT_TEXT
        ids = tokenize(text)
    ids = ids[:n]
    if bos is not None and n > 0:
        ids = [bos] + ids[: n - 1]
    return ids


# --------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------


def open_llama(n_seq_max: int = 1, **kwargs):
    """llama_cpp.Llama with llama.cpp's extra weight buffer types turned off.

    On this machine class (Xeon VMs advertising AMX), a
    GGML_NATIVE build repacks Q4_1 weights for AMX and then segfaults in the
    first llama_decode. `use_extra_bufts = false` keeps the weights in the
    plain CPU buffer (AVX-512 kernels); llama-cpp-python does not expose the
    flag, so patch the default model params it starts from. The same goes
    for the number of parallel sequences (batched decode): n_seq_max
    sequences, each with its own KV stream of n_ctx / n_seq_max cells
    (kv_unified = false, as in llama.cpp's batched-bench, so attention does
    not scan the other sequences' cells).
    """
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama

    orig_model = C.llama_model_default_params
    orig_ctx = C.llama_context_default_params

    def model_params():
        p = orig_model()
        p.use_extra_bufts = False
        return p

    def ctx_params():
        p = orig_ctx()
        p.n_seq_max = n_seq_max
        p.kv_unified = False
        return p

    C.llama_model_default_params = model_params
    C.llama_context_default_params = ctx_params
    try:
        return Llama(**kwargs)
    finally:
        C.llama_model_default_params = orig_model
        C.llama_context_default_params = orig_ctx


def last_logits(llama_cpp, ctx, i: int, n_vocab: int):
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def run_llama_cpp(a) -> dict:
    import numpy as np
    import llama_cpp

    b, n_p, n_g = a.batch, a.prompt_tokens, a.gen_tokens
    n_ctx = n_p + n_g + 8
    t_load = time.perf_counter()
    llm = open_llama(
        n_seq_max=b,
        model_path=a.gguf,
        n_ctx=n_ctx * b,
        n_batch=max(512, b * n_p),
        n_ubatch=max(512, b * n_p),
        n_threads=a.threads,
        n_threads_batch=a.threads,
        logits_all=False,
        verbose=False,
        seed=0,
        flash_attn=False,
    )
    load_s = time.perf_counter() - t_load
    bos = llm.token_bos()
    ids = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), n_p, bos)
    n_vocab = llm.n_vocab()
    rss_loaded = current_rss_bytes()

    if b == 1:
        # Warm-up (page in the weights, build threads), then measure.
        llm.reset()
        llm.eval(ids[:8])
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t_pre = time.perf_counter() - t0
        nxt = int(np.argmax(last_logits(llama_cpp, llm.ctx, -1, n_vocab)))
        ttft = time.perf_counter() - t0
        out = [nxt]
        t1 = time.perf_counter()
        for _ in range(n_g):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits(llama_cpp, llm.ctx, -1, n_vocab)))
            out.append(nxt)
        t_dec = time.perf_counter() - t1
        text = llm.detokenize(out[:16]).decode("utf-8", errors="replace")
        return result(a, "llama-cpp", llama_cpp.__version__, load_s, t_pre, ttft, t_dec, rss_loaded,
                      sample_text=text)

    # Batched: one sequence per request, whole batch per llama_decode.
    ctx = llm.ctx
    batch = llama_cpp.llama_batch_init(max(b * n_p, b), 0, b)

    def fill(tokens_per_seq: list[list[int]], start_pos: int, logits_last: bool) -> list[int]:
        """Lays the sequences out in the batch; returns the batch indices of
        the tokens whose logits are requested (llama_get_logits_ith takes
        batch indices)."""
        k, rows = 0, []
        for s, toks in enumerate(tokens_per_seq):
            for j, t in enumerate(toks):
                batch.token[k] = t
                batch.pos[k] = start_pos + j
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = s
                want = logits_last and j == len(toks) - 1
                batch.logits[k] = 1 if want else 0
                if want:
                    rows.append(k)
                k += 1
        batch.n_tokens = k
        return rows

    def decode() -> None:
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax_rows(rows: list[int]) -> list[int]:
        return [int(np.argmax(last_logits(llama_cpp, ctx, i, n_vocab))) for i in rows]

    mem = llama_cpp.llama_get_memory(ctx)

    def clear() -> None:
        llama_cpp.llama_memory_clear(mem, True)

    # Warm-up.
    fill([ids[:8]], 0, True)
    decode()
    clear()

    prompts = [ids] * b
    t0 = time.perf_counter()
    rows = fill(prompts, 0, True)
    decode()
    t_pre = time.perf_counter() - t0
    nxt = argmax_rows(rows)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(n_g):
        rows = fill([[t] for t in nxt], n_p + step, True)
        decode()
        nxt = argmax_rows(rows)
    t_dec = time.perf_counter() - t1
    llama_cpp.llama_batch_free(batch)
    return result(a, "llama-cpp", llama_cpp.__version__, load_s, t_pre, ttft, t_dec, rss_loaded)


# --------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------


def run_transformers(a) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(a.threads)
    b, n_p, n_g = a.batch, a.prompt_tokens, a.gen_tokens
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    t_load = time.perf_counter()
    if a.hf_dir:
        tok = AutoTokenizer.from_pretrained(a.hf_dir)
        model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=dtype)
    else:
        d, name = os.path.dirname(os.path.abspath(a.gguf)), os.path.basename(a.gguf)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
    model = model.to(a.device).eval()
    load_s = time.perf_counter() - t_load
    ids = prompt_ids(lambda s: tok(s, add_special_tokens=False)["input_ids"], n_p, tok.bos_token_id)
    rss_loaded = current_rss_bytes()
    x = torch.tensor([ids] * b, device=a.device)

    def sync() -> None:
        # GPU work is asynchronous: a clock read means nothing before it ends.
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        model(input_ids=x[:, :8], use_cache=False)  # warm-up
        sync()
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        sync()
        t_pre = time.perf_counter() - t0
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        first = [int(nxt[0, 0])]
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n_g):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            # Reading the token back is what a server streaming it does.
            first.append(int(nxt[0, 0]))
        t_dec = time.perf_counter() - t1
    text = tok.decode(first[:16])
    version = f"{transformers.__version__} torch {torch.__version__} {a.dtype} {a.device}"
    if a.device.startswith("cuda"):
        version += f" ({torch.cuda.get_device_name()})"
    return result(a, "transformers", version, load_s, t_pre, ttft, t_dec, rss_loaded,
                  sample_text=text)


def result(a, engine, version, load_s, t_pre, ttft, t_dec, rss_loaded, sample_text=None) -> dict:
    b = a.batch
    r = {
        "engine": engine,
        "engine_version": version,
        "batch": b,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "threads": a.threads,
        "load_s": round(load_s, 4),
        "prefill_s": round(t_pre, 6),
        "prefill_tokens_per_s": round(b * a.prompt_tokens / t_pre, 2),
        "ttft_s": round(ttft, 6),
        "decode_s": round(t_dec, 6),
        "decode_tokens_per_s": round(b * a.gen_tokens / t_dec, 2),
        "per_sequence_decode_tokens_per_s": round(a.gen_tokens / t_dec, 2),
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if sample_text is not None:
        r["sample_text"] = sample_text
    return r


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def pick_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import llama_cpp  # noqa: F401

        return "llama-cpp"
    except ImportError:
        return "transformers"


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem_bytes": mem,
            "python": sys.version.split()[0], "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF model file")
    ap.add_argument("--hf-dir", help="Hugging Face model directory (transformers only)")
    ap.add_argument("--device", default="cpu", help="transformers: cpu or cuda")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="transformers: the weights' and activations' type")
    ap.add_argument("--engine", choices=["auto", "llama-cpp", "transformers"], default="auto")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if bool(a.gguf) == bool(a.hf_dir):
        sys.exit("bench_reference: give one of --gguf and --hf-dir")
    if a.gguf and not os.path.isfile(a.gguf):
        sys.exit(f"bench_reference: no such GGUF file: {a.gguf}")
    if a.hf_dir and not os.path.isfile(os.path.join(a.hf_dir, "config.json")):
        sys.exit(f"bench_reference: no config.json in {a.hf_dir}")
    if a.hf_dir and a.engine == "llama-cpp":
        sys.exit("bench_reference: llama.cpp reads GGUF files only")
    if a.prompt_tokens < 1 or a.gen_tokens < 1:
        sys.exit("bench_reference: --prompt-tokens and --gen-tokens must be >= 1")

    if a.worker:
        a.batch = int(a.batch)
        fn = run_llama_cpp if a.engine == "llama-cpp" else run_transformers
        print(json.dumps(fn(a)))
        return

    engine = "transformers" if a.hf_dir else pick_engine(a.engine)
    model_arg = ["--hf-dir", a.hf_dir] if a.hf_dir else ["--gguf", a.gguf]
    load_before = os.getloadavg()
    batches = [int(x) for x in a.batch.split(",") if x.strip()]
    runs = []
    for b in batches:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", *model_arg,
               "--engine", engine, "--batch", str(b), "--prompt-tokens", str(a.prompt_tokens),
               "--gen-tokens", str(a.gen_tokens), "--threads", str(a.threads),
               "--device", a.device, "--dtype", a.dtype]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            runs.append({"engine": engine, "batch": b, "error": p.stderr.strip()[-2000:]})
            continue
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    mach = machine()
    # Other work on the machine skews these figures badly (llama.cpp's OpenMP
    # threads spin): keep the load averages so a reader can tell.
    mach["loadavg_before"] = [round(x, 2) for x in load_before]
    mach["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({"model": os.path.basename(a.gguf or a.hf_dir.rstrip("/")), "engine": engine,
                      "machine": mach,
                      "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
