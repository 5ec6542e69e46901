"""``xtp bench --vs`` names that are xtp (or a peer) with other settings: each is the
implementation its ranks run and the environment they get on top of the run's."""

from __future__ import annotations

#: --vs names that are xtp itself with other settings: (implementation, extra environment)
VARIANTS = {
    "xtp-dense": ("xtp", {"XTP_CPU_PACK": "0"}),  # xtp without inference packing
    # bf16 on several threads through oneDNN (the kernel kept off torch's OpenMP team)
    "xtp-onednn": ("xtp", {"XTP_CPU_GEMV_TEAM": "0"}),
    # xtp's GEMV kernel at every thread count, fp32 and bf16 (AMX CPUs too), on torch's OpenMP
    # threads ("-team") or on the kernel's own pool ("-pool")
    "xtp-kernel-team": ("xtp", {"XTP_CPU_PACK": "kernel", "XTP_CPU_GEMV_THREADS": "1024",
                                "XTP_CPU_GEMV_TEAM": "1"}),
    "xtp-kernel-pool": ("xtp", {"XTP_CPU_PACK": "kernel", "XTP_CPU_GEMV_THREADS": "1024",
                                "XTP_CPU_GEMV_TEAM": "0"}),
    # bf16 weights kept as plain rows for the kernel (no unpacked copy for prefill), and the
    # same with inputs of more than 4 rows (batches) on F.linear
    "xtp-kernel-rows": ("xtp", {"XTP_CPU_PACK": "kernel-rows"}),
    "xtp-kernel-rows4": ("xtp", {"XTP_CPU_PACK": "kernel-rows", "XTP_CPU_GEMV_ROWS": "4"}),
    # torch's ops on one thread, the kernel's products on all the rank's cores (its own pool)
    "xtp-kernel-solo": ("xtp", {"XTP_CPU_PACK": "kernel", "XTP_NUM_THREADS": "1",
                                "XTP_CPU_GEMV_SPLIT": "cores"}),
    # decode through torch.compile over a static KV cache (the compile is timed apart), or
    # eagerly: whatever --decode says for the others (auto: compiled on CUDA, eager on the CPU)
    "xtp-compiled": ("xtp", {"XTP_BENCH_DECODE": "compiled"}),
    "xtp-eager": ("xtp", {"XTP_BENCH_DECODE": "eager"}),
    "deepspeed-compiled": ("deepspeed", {"XTP_BENCH_DECODE": "compiled"}),
    "unsharded-compiled": ("unsharded", {"XTP_BENCH_DECODE": "compiled"}),
}
