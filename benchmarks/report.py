"""Markdown tables of benchmarks/README.md from a pytest-benchmark JSON file.

    python benchmarks/report.py out/bench_ops.json

Per op and length: the median time of each implementation, its effective bandwidth
(bytes the op must move / median), the speedup of each kernel over the naive loop, and
the kernel's fraction of the ``copy_`` bandwidth measured at the same length in the same
run (the ceiling for a memory-bound op).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

OP_ORDER = ["gather", "stitch swap", "stitch mean", "sync_ swap", "sync_ mean"]
IMPL_ORDER = ["cuda", "triton", "cpp", "cpp op", "cpp op, interval 64", "reference", "naive"]


def main(path: str) -> None:
    data = json.load(open(path))
    rows = defaultdict(dict)      # (device, op, minutes) -> impl -> (median s, bytes, views)
    copy = {}                     # (device, minutes) -> copy GB/s
    overhead = defaultdict(dict)  # reference? -> caller -> median s
    for bench in data["benchmarks"]:
        info, median = bench["extra_info"], bench["stats"]["median"]
        if info["op"] == "copy":
            copy[info["device"], info["minutes"]] = info["bytes"] / median / 1e9
        elif info["op"] == "overhead":
            overhead[info["reference"]][info["impl"]] = (median, info["rows"])
        else:
            rows[info["device"], info["op"], info["minutes"]][info["impl"]] = (median, info["bytes"], info["views"])

    machine = data["machine_info"]
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine['processor'])}, "
          f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; "
          f"torch {data['benchmarks'][0]['extra_info']['torch']}, "
          f"threads {data['benchmarks'][0]['extra_info']['threads']}; {data['datetime'][:10]}\n")

    for device in sorted({k[0] for k in rows}):
        for op in OP_ORDER:
            keys = sorted(k for k in rows if k[0] == device and k[1] == op)
            if not keys:
                continue
            impls = [i for i in IMPL_ORDER if any(i in rows[k] for k in keys)]
            kernels = [i for i in impls if i not in ("naive", "reference")]
            head = ["min", "views", "MB moved", "copy_ GB/s"] + [f"{i} ms (GB/s)" for i in impls]
            head += [f"{k} vs naive" for k in kernels] + [f"{k} % of copy_" for k in kernels]
            print(f"**{op}** ({device})\n")
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for key in keys:
                entry = rows[key]
                _, nbytes, views = next(iter(entry.values()))
                copy_bw = copy.get((device, key[2]))
                cells = [str(key[2]), str(views), f"{nbytes / 1e6:.2f}", f"{copy_bw:.1f}" if copy_bw else "-"]
                for impl in impls:
                    t = entry.get(impl)
                    cells.append(f"{t[0] * 1e3:.3f} ({nbytes / t[0] / 1e9:.1f})" if t else "-")
                for k in kernels:
                    ok = k in entry and "naive" in entry
                    cells.append(f"{entry['naive'][0] / entry[k][0]:.1f}x" if ok else "-")
                for k in kernels:
                    ok = k in entry and copy_bw
                    cells.append(f"{100 * nbytes / entry[k][0] / 1e9 / copy_bw:.0f}%" if ok else "-")
                print("| " + " | ".join(cells) + " |")
            print()

    if overhead:
        callers = ["public sync_", "raw op", "custom_op wrapper"]
        print("**Per-call overhead, 10 s latent (one view), CPU** (median us)\n")
        print("| plan | rows | " + " | ".join(callers) + " | custom_op - raw op | public - raw op |")
        print("|---|---|" + "---|" * (len(callers) + 2))
        for with_ref in sorted(overhead):
            entry = overhead[with_ref]
            us = {c: entry[c][0] * 1e6 for c in callers if c in entry}
            rows_n = next(iter(entry.values()))[1]
            name = "sync_ swap + reference" if with_ref else "sync_ swap (empty: nothing to do)"
            cells = [name, str(rows_n)] + [f"{us[c]:.1f}" if c in us else "-" for c in callers]
            cells.append(f"{us['custom_op wrapper'] - us['raw op']:.1f}")
            cells.append(f"{us['public sync_'] - us['raw op']:.1f}")
            print("| " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
