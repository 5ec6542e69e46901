"""``xtp verify`` and ``xtp bench`` as a user drives them: subprocesses, real ranks on CPU.

The bench tests run the ranks with this interpreter, which has no DeepSpeed: the peer is
skipped with a message (the real comparison is in bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest


def xtp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xtp.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.distributed
def test_verify_tp2_matches_unsharded():
    proc = xtp("verify", "tiny-llama", "--tp", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "model tiny-llama  tp 2  dtype float32  device cpu" in out
    assert "batch 3/3 (2 x 32 tokens): max abs error" in out
    rel = float(out.split("relative error: ")[1].split()[0])
    assert rel <= 1e-5
    assert "greedy tokens match: yes (2 x 8 tokens)" in out
    assert "verdict: OK" in out


@pytest.mark.distributed
def test_verify_bf16_tolerance_scales_with_the_half_types_own_error():
    proc = xtp("verify", "tiny-llama", "--tp", "2", "--dtype", "bfloat16", "--batches", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    own = float(out.split("model against float32: relative error ")[1].split()[0])
    rel = float(out.split("relative error: ")[1].split()[0])
    tol = float(out.split("(tolerance ")[1].split(")")[0])
    assert 0 < rel <= tol and tol == pytest.approx(max(8 * 2**-8, 2 * own), rel=1e-2)


@pytest.mark.distributed
def test_verify_exit_code_1_when_error_exceeds_tolerance():
    proc = xtp("verify", "tiny-llama", "--tp", "2", "--batches", "1", "--new-tokens", "0",
               "--tolerance", "1e-12")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "TOO LARGE" in proc.stdout and "verdict: MISMATCH" in proc.stdout
    assert "greedy tokens: not compared" in proc.stdout


def test_verify_user_errors_are_one_line():
    proc = xtp("verify", "no-such-model", "--tp", "2")
    assert proc.returncode == 2
    assert proc.stderr.startswith("xtp verify: error: MODEL 'no-such-model'")
    proc = xtp("verify", "tiny-llama", "--tp", "0")
    assert proc.returncode == 2 and "--tp must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_bench_tiny_tp_1_2_skips_missing_peer(tmp_path):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("this interpreter has deepspeed: the skip path cannot be shown with it")
    out_json = tmp_path / "bench.json"
    proc = xtp("bench", "tiny-llama", "--tp", "1,2", "--decode-steps", "4", "--prefill-tokens",
               "16", "--repeats", "1", "--vs", "deepspeed", "--python", sys.executable,
               "--cache-dir", str(tmp_path / "cache"), "--json", str(out_json))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "deepspeed: skipped (deepspeed is not importable by" in out
    assert "threads per rank: tp 1 -> " in out and "tp 2 -> " in out
    assert out.count("GB/s (all ranks) -> floor ") == 3  # every run measured its bandwidth
    assert "saving tiny-llama with seeded random weights (float32)" in out
    assert "| xtp | float32 | 1 |" in out and "| xtp | float32 | 2 |" in out
    assert "| unsharded | float32 | 1 |" in out
    assert "prefill: 1 x 16 tokens; decode: median of 4 steps" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["impl"], r["tp"]) for r in rows] == [("xtp", 1), ("xtp", 2), ("unsharded", 1)]
    for r in rows:
        assert r["ok"], r
        assert r["decode_ms"] > 0 and r["prefill_ms"] > 0 and r["ready_s"] > 0
        assert r["peak_rss_mib"] > r["base_rss_mib"] > 0
        assert r["floor_ms"] > 0 and r["load_before"].startswith("load ")
    # the sharded model decodes the same greedy tokens as the unsharded one
    assert rows[0]["tokens"] == rows[1]["tokens"] == rows[2]["tokens"]


def test_bench_unknown_peer_is_a_user_error():
    proc = xtp("bench", "tiny-llama", "--vs", "nonexistentpeer")
    assert proc.returncode == 2
    assert "unknown implementation; known peers: deepspeed, transformers, xtp-dense" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_bad_lists_are_user_errors():
    proc = xtp("bench", "tiny-llama", "--tp", "1,x")
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr
    proc = xtp("bench", "tiny-llama", "--dtype", "float33")
    assert proc.returncode == 2 and "is not a torch dtype" in proc.stderr


def test_bench_checkpoint_cache_is_saved_once(tmp_path):
    from xtp.bench.prep import checkpoint_for, weight_bytes

    logs: list[str] = []
    first = checkpoint_for("tiny-llama", "bfloat16", tmp_path, log=logs.append)
    assert (first / "config.json").is_file() and first.name == "tiny-llama-bfloat16"
    assert checkpoint_for("tiny-llama", "bfloat16", tmp_path, log=logs.append) == first
    assert sum("saving" in line for line in logs) == 1
    total, per_token = weight_bytes(first, "bfloat16")
    # untied: a decode step reads everything but the input embedding table (one row of it)
    assert per_token == total - 1031 * 192 * 2 + 192 * 2


def test_bench_table_ratios_and_failed_rows():
    from xtp.bench.report import fold, table

    def rank(impl, tp, decode, rank=0, **kw):
        return dict(rank=rank, impl=impl, tp=tp, dtype="float32", threads=1, ok=True,
                    ready_s=2.0, load_s=1.0, prefill_ms=100.0, decode_ms=decode,
                    peak_rss_mib=500.0, base_rss_mib=300.0, tokens=[1, 2], **kw)

    # each rank read 50 bytes/ms while both read: 500 bytes per step -> floor 5 ms
    bw = {"read_bytes_per_s": 50e3}
    rows = [fold([rank("xtp", 2, 10.0, **bw), rank("xtp", 2, 12.0, rank=1, **bw)], 500),
            fold([rank("deepspeed", 2, 18.0, **bw), rank("deepspeed", 2, 18.0, rank=1, **bw)],
                 500),
            fold([{"rank": 0, "impl": "transformers", "tp": 2, "dtype": "float32",
                   "ok": False, "error": "ValueError: boom"}], 500),
            fold([rank("xtp", 1, 20.0)], 500)]  # no bandwidth measured: no floor
    assert rows[0]["read_bytes_per_s"] == 100e3 and rows[3]["floor_ms"] is None
    text = table(rows)
    # the slowest rank counts: xtp decode 12 ms, deepspeed 18 -> 1.50x; floor 5 ms -> 2.40
    assert "| xtp | float32 | 2 | 1 | 2.0 | 100 | 12.0 | 500 | 5.0 | 2.40 | 1.00 |" in text
    assert "| deepspeed | float32 | 2 | 1 | 2.0 | 100 | 18.0 | 500 | 5.0 | 3.60 | 1.00 | 1.00 " \
           "| 1.50 | 1.00 |" in text
    assert "| transformers | float32 | 2 | - | failed: ValueError: boom |" in text
    assert "| xtp | float32 | 1 | 1 | 2.0 | 100 | 20.0 | 500 | - | - | 1.00 |" in text


def test_bench_rounds_take_the_median_time_and_the_largest_memory():
    from xtp.bench.report import merge_rounds

    rounds = [dict(impl="xtp", tp=2, dtype="float32", ok=True, ready_s=s, load_s=1.0,
                   prefill_ms=p, decode_ms=d, peak_rss_mib=m, base_rss_mib=300.0, floor_ms=f,
                   read_bytes_per_s=1e3 / f)
              for s, p, d, m, f in ((5.0, 100.0, 30.0, 500.0, 4.0), (9.0, 300.0, 10.0, 520.0, 6.0),
                                    (7.0, 200.0, 20.0, 510.0, 5.0))]
    rounds.append(dict(impl="xtp", tp=2, dtype="float32", ok=False, error="killed"))
    row = merge_rounds(rounds)
    assert (row["ready_s"], row["prefill_ms"], row["decode_ms"]) == (7.0, 200.0, 20.0)
    assert row["floor_ms"] == 5.0 and row["read_bytes_per_s"] == 200.0
    assert row["peak_rss_mib"] == 520.0 and len(row["rounds"]) == 4
    assert row["rounds"][3] == {"ok": False, "ready_s": None, "prefill_ms": None,
                                "decode_ms": None, "floor_ms": None, "load_before": None,
                                "load_after": None, "error": "killed"}


def test_bench_ratios_pair_runs_within_each_round():
    from xtp.bench.report import merge_rounds, table

    def rounds(impl, decodes, floors):
        return [dict(impl=impl, tp=2, dtype="float32", ok=True, threads=1, ready_s=2.0,
                     load_s=1.0, prefill_ms=100.0, decode_ms=d, floor_ms=f,
                     peak_rss_mib=500.0, base_rss_mib=300.0) for d, f in zip(decodes, floors)]

    # the machine is slow in round 2; deepspeed takes 1.1x xtp's time in two rounds of three
    xtp_row = merge_rounds(rounds("xtp", [100.0, 200.0, 105.0], [50.0, 100.0, 50.0]))
    ds_row = merge_rounds(rounds("deepspeed", [110.0, 220.0, 99.0], [55.0, 100.0, 45.0]))
    text = table([xtp_row, ds_row])
    # decode/floor per round: xtp 2.0, 2.0, 2.1 -> 2.00; deepspeed 2.0, 2.2, 2.2 -> 2.20
    # deepspeed / xtp per round: 1.10, 1.10, 0.943 -> 1.10 (the medians' ratio: 110/105 = 1.05)
    assert "| xtp | float32 | 2 | 1 | 2.0 | 100 | 105.0 | 500 | 50.0 | 2.00 | 1.00 |" in text
    assert ("| deepspeed | float32 | 2 | 1 | 2.0 | 100 | 110.0 | 500 | 55.0 | 2.20 | 1.00 | "
            "1.00 | 1.10 | 1.00 |") in text


def test_bench_counts_what_a_run_leaves_in_shm_and_removes_deepspeeds_leak(tmp_path):
    from xtp.bench.leaks import collect_leaks, shm_files

    (tmp_path / "older").write_bytes(b"x" * 10)
    before = shm_files(tmp_path)
    (tmp_path / "deepspeed_allreduce_buffer_0_localhost_29500_1").write_bytes(b"x" * 2**20)
    (tmp_path / "someone_elses").write_bytes(b"x" * 2**20)
    leaks = collect_leaks(before, tmp_path)
    assert leaks == {"files": 2, "mib": 2.0, "removed": ["DeepSpeed's CPU all-reduce buffers"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["older", "someone_elses"]
    assert collect_leaks(shm_files(tmp_path), tmp_path) == {"files": 0, "mib": 0.0,
                                                            "removed": []}
    assert shm_files(tmp_path / "missing") == set()


def test_bench_measure_decodes_a_batch_greedily_per_sequence():
    """``xtp bench --batch 3``'s rank code: prefill of 3 x 8 tokens, then every step's tokens
    are the 3 sequences' greedy choices (what ``generate`` picks for each row)."""
    import torch

    from xtp.bench.rank import measure
    from xtp.models.builtin import build_random, resolve_config

    torch.manual_seed(0)
    model = build_random(resolve_config("tiny-llama")).eval()
    vocab = model.config.vocab_size
    out = measure(model, vocab, torch.device("cpu"), prefill_tokens=8, repeats=1,
                  decode_steps=4, warmup=1, profile=False, batch=3)
    assert out["prefill_ms"] > 0 and len(out["decode_ms_all"]) == 4
    ids = torch.randint(0, vocab, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    # step k of measure (after the prefill's token and one warmup step) is new token k + 2
    assert out["tokens"] == [want[:, 8 + 2 + k].tolist() for k in range(4)]


@pytest.mark.slow
def test_bench_measure_compiled_decode_gives_generates_tokens():
    """``xtp bench --vs xtp-compiled``'s rank code: a static cache and ``torch.compile``; its
    greedy tokens are still ``generate``'s, the compiling warm-up is timed apart, and every
    step runs the one graph compiled for it (no recompile per position)."""
    import torch

    from xtp.bench.rank import measure
    from xtp.models.builtin import build_random, resolve_config

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = build_random(resolve_config("tiny-llama")).eval()
    vocab = model.config.vocab_size
    out = measure(model, vocab, torch.device("cpu"), prefill_tokens=8, repeats=1,
                  decode_steps=5, warmup=1, profile=False, batch=2, decode="compiled")
    assert out["compile_s"] > 0 and len(out["decode_ms_all"]) == 5
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=7, do_sample=False, min_new_tokens=7)
    assert out["tokens"] == [want[:, 8 + 2 + k].tolist() for k in range(5)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_bench_compiled_variants_are_known_implementations():
    from xtp.cli.bench import VARIANTS

    for name, base in (("xtp-compiled", "xtp"), ("deepspeed-compiled", "deepspeed"),
                       ("unsharded-compiled", "unsharded")):
        impl, env = VARIANTS[name]
        assert impl == base and env == {"XTP_BENCH_DECODE": "compiled"}


def test_bench_decode_auto_is_compiled_only_where_the_accelerator_says_so(monkeypatch):
    """``--decode auto`` follows the accelerator's ``compiled_decode`` (CUDA: True; the CPU:
    False); an explicit choice is kept. A stand-in accelerator shows the CUDA branch: this
    proves the selection, not that CUDA decodes faster (bench/RESULTS.md measures that)."""
    import xtp.accelerators as accelerators
    from xtp.accelerators.devices.cuda import CudaAccelerator
    from xtp.cli.bench import resolve_decode

    monkeypatch.setenv("XTP_ACCELERATOR", "cpu")
    accelerators.reset_accelerator()
    try:
        mode, why = resolve_decode("auto")
        assert mode == "eager" and why.startswith("decode: eager (cpu:")
        assert resolve_decode("compiled") == ("compiled", "decode: compiled (--decode compiled)")
        monkeypatch.setattr(accelerators, "get_accelerator", lambda: CudaAccelerator())
        mode, why = resolve_decode("auto")
        assert mode == "compiled" and "--decode eager or --vs xtp-eager" in why
        assert resolve_decode("eager")[0] == "eager"
    finally:
        accelerators.reset_accelerator()


def test_bench_ranks_get_the_decode_of_the_run_unless_a_variant_sets_its_own(monkeypatch,
                                                                            tmp_path):
    """``launch`` passes ``--decode`` to every rank: the run's, or the variant's own
    (``xtp-compiled``, ``xtp-eager``)."""
    import argparse

    import xtp.cli.bench as bench

    seen = []

    class Stop(Exception):
        pass

    def popen(cmd, **kwargs):
        seen.append(cmd[cmd.index("--decode") + 1])
        raise Stop

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    args = argparse.Namespace(prefill_tokens=4, batch=1, repeats=1, decode_steps=2, warmup=1,
                              profile=False, no_bandwidth=True, decode="compiled", timeout=5)
    for impl in ("xtp", "xtp-eager", "unsharded-compiled"):
        with pytest.raises(Stop):
            bench.launch(sys.executable, impl, "ckpt", 1, "float32", 1, args)
    args.decode = "eager"
    with pytest.raises(Stop):
        bench.launch(sys.executable, "xtp-compiled", "ckpt", 1, "float32", 1, args)
    assert seen == ["compiled", "eager", "compiled", "compiled"]
